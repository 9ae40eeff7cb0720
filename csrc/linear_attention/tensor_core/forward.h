// The tensor-core forward of linear attention (bf16 and fp16 inputs, fp32 accumulation), written
// once against the warp-operation layer (common/warp/) for the GPU and its CPU emulation.
//
// One block of 8 warps owns one (batch, head) and scans its sequence in chunks of 64 rows. The
// state St = [S | z] (feature dim × (value dim + 1), fp32) lives in the warps' mma accumulator
// registers from the first chunk to the last, never in global memory; a bf16/fp16 copy of it sits
// in shared memory for the chunk's queries to read (float16's over a power of two past its range:
// state_scale.h). Per chunk (causal):
//   O   = φ(Q)·St_prev + mask(φ(Q) φ(K)ᵀ) · [V | 1]      scores and output on tensor cores
//   St += φ(K)ᵀ · [V | 1]
// and the output row is O's numerator over its last column (the normalizer) + eps. The ones
// column of [V | 1] is an extra 8-column mma tile generated in registers, so the normalizer is
// computed by the same instructions (and the same rounding of the scores) as the numerator.
// φ is applied to the rows in shared memory as they land, by the thread that copied them, and is
// 0 for padded keys, rows past the end and columns past the head dim, so those add nothing.
// Non-causal: one pass accumulates St over every key chunk, a second reads every query chunk.
// The next chunk's rows are in flight (cp.async, double-buffered) while the current one computes.
//
// Warp w owns, for the output, query rows 16 (w % 4) .. +15 of the chunk and half the value
// columns (w / 4) plus the normalizer tile; for the state, a contiguous range of its 16×8 tiles.
#pragma once

#include "forward_block.h"

namespace linattn {
namespace tensor_core {

// The block program. `exec(phase)` runs phase(warp context, warp state) for every warp of the
// block, then waits for all of them (a barrier).
// kFading: the instance for a fading state (p.log_decay set), compiled apart; kChannels with it:
// gates per channel (p.gate_per_channel).
template <int DK, int DV, bool kFading, bool kChannels = false, typename scalar_t, typename Exec>
LINATTN_HD LINATTN_INLINE void run_forward_block(const Exec& exec, const ForwardProblem<scalar_t>& p, int64_t block) {
  using Block = ForwardBlock<scalar_t, DK, DV, kFading, kChannels>;
  using State = WarpState<DK, DV>;
  const Block blk(p, block);

  // Streams rows [begin, end) in chunks: `work(w, s, start, base)` runs once the chunk's rows
  // (from row `start`; past the sequence's end, zeros) are in shared memory, while the next chunk's
  // are in flight.
  // `republish`: the state changes with every chunk, and its 16-bit copy is rewritten once every
  // warp has read the old one.
  auto stream = [&](int64_t begin, int64_t end, bool want_q, bool want_kv, bool republish, auto&& work) {
    const int64_t chunks = (end - begin + kChunk - 1) / kChunk;
    if (chunks <= 0) return;
    exec([&](const WarpContext& w, State&) { blk.issue_chunk(w, 0, begin, want_q, want_kv); });
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      const int64_t start = begin + chunk * kChunk;
      exec([&](const WarpContext& w, State& s) {
        if (republish && chunk > 0) blk.publish_state(w, s);
        blk.prepare_chunk(w, chunk, start, want_q, want_kv);
      });
      // Gates per channel: the scores' diagonal blocks, once every row of the chunk is ready.
      if constexpr (kChannels) {
        if (want_q && want_kv) exec([&](const WarpContext& w, State&) { blk.diagonal_pairs(w, Block::buffer(chunk)); });
      }
      exec([&](const WarpContext& w, State& s) {
        if (chunk + 1 < chunks) blk.issue_chunk(w, chunk + 1, start + kChunk, want_q, want_kv);
        work(w, s, start, Block::buffer(chunk));
      });
    }
  };
  // (float16's copy is scaled by the size every warp recorded since the state changed: only
  // where a publish follows; state_scale.h.)
  auto outputs = [&](const WarpContext& w, State& s, int64_t start, uint32_t base) {
    blk.output(w, base, start, p.causal);
    if (p.causal) {
      blk.update_state(w, s, base);
      Block::Scales::record(w, s);
    }
  };
  auto accumulate = [&](const WarpContext& w, State& s, int64_t, uint32_t base) { blk.update_state(w, s, base); };

  int64_t q_begin = 0, q_end = 0, k_begin = 0, k_end = 0;
  blk.query_rows(q_begin, q_end);
  blk.key_rows(k_begin, k_end);
  // A block without rows that writes no state (a packed sequence's segment past its end) has
  // nothing to do: its state would be read for nothing. (Uniform over the block.)
  if (q_begin == q_end && k_begin == k_end && p.state_out.data == nullptr) return;
  // (Two phases: float16's copy is scaled by a size every warp recorded as it loaded its tiles.)
  const bool publishes = p.pass != Pass::kSegmentStates;
  exec([&](const WarpContext& w, State& s) {
    blk.load_state(w, s);
    if (publishes) Block::Scales::record(w, s);
  });
  if (publishes) exec([&](const WarpContext& w, State& s) { blk.publish_state(w, s); });
  if (p.pass == Pass::kSegmentStates) {
    stream(k_begin, k_end, false, true, false, accumulate);
  } else if (p.causal) {
    stream(q_begin, q_end, true, true, true, outputs);
  } else {
    if (p.pass == Pass::kWhole) {
      stream(k_begin, k_end, false, true, false, accumulate);
      exec([&](const WarpContext& w, State& s) { Block::Scales::record(w, s); });
      exec([&](const WarpContext& w, State& s) { blk.publish_state(w, s); });
    }
    stream(q_begin, q_end, true, false, false, outputs);
  }
  exec([&](const WarpContext& w, State& s) { blk.store_state(w, s); });
}

}  // namespace tensor_core
}  // namespace linattn
