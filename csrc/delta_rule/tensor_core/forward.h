// The delta rule's tensor-core forward (DeltaNet, Gated DeltaNet, KDA; bf16 and fp16 inputs, fp32
// accumulation), written once against the warp-operation layer (common/warp/) for the GPU and its
// CPU emulation. The chunkwise algorithm of the CPU kernel (cpu_kernel_impl.h says it step by
// step; docs/methods.md §11 derives it), on tensor cores:
//
// One block of 8 warps owns one (batch or packed sequence, head, value tile) and walks its
// sequence in chunks of 64 rows. The state S (key dim × value tile, fp32) lives in the warps' mma
// accumulator registers from the first chunk to the last; a 16-bit copy sits in shared memory for
// the products that read it. Per chunk, phases separated by barriers:
//   rows land (cp.async, the next chunk's in flight), gates: β, G, e^G, e^{G_last − G};
//   K and V rows screened for Inf and NaN (forward_block.h, screen_rows: a later row's never
//   reaches an earlier one; rows from the first flagged one on, and the state, are NaN);
//   q and k rows normalised (normalize_qk);
//   A = strict_tril(diag(β)(K Kᵀ ⊙ Γ))                  tensor cores, then fp32 in shared memory
//   T = (I + A)⁻¹                                        fp32: 16-blocks by substitution, doubling
//   u = Tu V − (Tw K) S0                                 tensor cores; W never leaves registers
//   O = scale (diag(e^G) Q S0 + (Q Kᵀ ⊙ Γ ⊙ lower) u),  S1 = e^{G_last} S0 + Kᵀ diag(decay) u.
// Non-causal: one pass walks the state over every chunk, a second reads the final state with
// every query chunk, O = scale · Q S_T.
#pragma once

#include "forward_block.h"

namespace linattn {
namespace delta_tensor_core {

// kKeep: the backward's re-walk (fused_backward.h), keeping the state entering every chunk and u.
// kChannels: gates per key channel (forward_block.h says what changes).
template <int DK, int DV, bool kKeep = false, bool kChannels = false, typename scalar_t, typename Exec>
LINATTN_HD LINATTN_INLINE void run_delta_forward_block(const Exec& exec, const DeltaForwardProblem<scalar_t>& p,
                                                       int64_t block) {
  using Block = DeltaForwardBlock<scalar_t, DK, DV, kKeep, kChannels>;
  using State = DeltaState<DK, DV>;
  const Block blk(p, block);
  const int64_t chunks = blk.chunks();

  exec([&](const WarpContext& w, State& s) {
    blk.load_state(w, s);
    blk.publish_state(w, s);
  });
  // Walks the chunks; with `outputs` (causal) each chunk's rows are written before the state moves on.
  auto walk_state = [&](bool outputs) {
    if (chunks == 0) return;  // an empty packed sequence: its state passes through
    exec([&](const WarpContext& w, State&) { blk.issue_chunk(w, 0, 0, outputs, true); });
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      const int64_t start = chunk * kChunk;
      const uint32_t base = Block::buffer(chunk);
      const int rows = static_cast<int>(blk.rows - start < kChunk ? blk.rows - start : kChunk);
      exec([&](const WarpContext& w, State& s) {
        if (chunk > 0) blk.publish_state(w, s);  // every warp has read the previous state
        blk.store_chunk_state(w, s, chunk);       // (the state entering the chunk, where it is kept)
        warp::cp_async_wait<0>(w);
        if (chunk + 1 < chunks) blk.issue_chunk(w, chunk + 1, start + kChunk, outputs, true);
        blk.load_gates(w, start, /*screen=*/true);
      });
      prepare_chunk<State>(exec, blk, base, start, outputs, /*screen=*/true);
      exec([&](const WarpContext& w, State&) { blk.pseudo_values(w, base, start); });
      exec([&](const WarpContext& w, State& s) {
        if (outputs) blk.output(w, base, start, true);
        blk.update_state(w, s, base, rows);
        blk.poison_state(w, s);
      });
    }
  };

  if (p.causal || p.out == nullptr) {  // without outputs (the sequence split's maps): the state alone
    walk_state(p.out != nullptr);
  } else {
    walk_state(false);
    exec([&](const WarpContext& w, State& s) {
      blk.publish_state(w, s);
      if (chunks > 0) blk.issue_chunk(w, 0, 0, true, false);
    });
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      const int64_t start = chunk * kChunk;
      const uint32_t base = Block::buffer(chunk);
      exec([&](const WarpContext& w, State&) {
        warp::cp_async_wait<0>(w);
        if (chunk + 1 < chunks) blk.issue_chunk(w, chunk + 1, start + kChunk, true, false);
      });
      if (p.normalize_qk) exec([&](const WarpContext& w, State&) { blk.normalize_rows(w, base, true, false); });
      exec([&](const WarpContext& w, State&) { blk.output(w, base, start, false); });
    }
  }
  exec([&](const WarpContext& w, State& s) { blk.store_state(w, s); });
}

}  // namespace delta_tensor_core
}  // namespace linattn
