// The tensor-core backward of linear attention (bf16 and fp16 inputs, fp32 accumulation, head dims
// up to 128), written once against the warp-operation layer (common/warp/) for the GPU and its CPU
// emulation. Two launches, a block of 8 warps per (batch, head) in each, chunks of 64 rows
// (docs/guide/cuda.md, "The tensor-core backward"; G' is the cotangent of [numerator | normalizer],
// built from grad_out, out and the saved normalizer as the rows land):
//
//   query pass, forwards in time, the state Sᵀ (value dim × feature dim, fp32 registers) and z:
//     dφ(q)_i = G_i Sᵀ + gn_i z + Σ_{j <= i in the chunk} (G_i · v_j + gn_i) φ(k_j)
//     Sᵀ += Vᵀ φ(K),  z += Σ φ(k_j);  it also writes each row's 1 / d and gn for the next pass
//     (G_i = g_i / d_i rounded to 16 bits, gn_i = −G_i · o_i);
//   key-value pass, backwards in time, U = dS_N + Σ_{later rows} φ(q_i) G'_iᵀ (fp32 registers):
//     dv_j    = φ(k_j) U_v + Σ_{i >= j} (φ(k_j) · φ(q_i)) G_i
//     dφ(k)_j = U_v v_j + u + Σ_{i >= j} (v_j · G_i + gn_i) φ(q_i)
//     U += φ(Q)ᵀ G';  after the first chunk U is dS0.
// A fading state (log factors; causal) weights each part as the forward does and fades both
// states across a chunk; each pass also writes its rows' φ(q)·dφ(q) or φ(k)·dφ(k) (row_terms),
// from which the host forms dL/dc (fused_plans.h, tensor_core_backward).
// Non-causal: the state over every key (query pass; or the forward's final state, handed over)
// or U over every query (key-value pass) first, then the rows against it. No state per chunk ever
// reaches memory, and nothing is accumulated with atomics: deterministic. One long sequence is
// split into segments, a block each, from states summed per segment (plan.h, split_backward).
#pragma once

#include "backward_block.h"

namespace linattn {
namespace tensor_core {

// Streams chunks: `work(w, s, base, start, rows)` runs once a chunk's rows are in shared memory,
// while the next one's are in flight; `between(w, s, step, previous base)` runs first in the phase
// that prepares chunk `step` (> 0), once every warp is done with the chunk before. Rows
// [begin, end), forwards or backwards in time.
template <typename Block, typename Exec, typename Between, typename Work>
LINATTN_HD LINATTN_INLINE void stream_chunks(const Exec& exec, const Block& blk, int64_t begin, int64_t end,
                                             bool reverse, bool queries, bool keys, const Between& between,
                                             const Work& work) {
  const int64_t chunks = (end - begin + kChunk - 1) / kChunk;
  if (chunks <= 0) return;
  auto start_of = [&](int64_t step) { return begin + (reverse ? chunks - 1 - step : step) * kChunk; };
  exec([&](const WarpContext& w, auto&) { blk.issue_chunk(w, Block::buffer(0), start_of(0), queries, keys); });
  for (int64_t step = 0; step < chunks; ++step) {
    const int64_t start = start_of(step);
    const uint32_t base = Block::buffer(step);
    exec([&](const WarpContext& w, auto& s) {
      if (step > 0) between(w, s, Block::buffer(step - 1));
      blk.prepare_chunk(w, base, start, queries, keys);
    });
    // Gates per channel: the diagonal blocks' pair weights, once every row of the chunk is ready.
    if constexpr (Block::kPerChannel) {
      if (queries && keys && blk.wants_diagonal_pairs()) {
        exec([&](const WarpContext& w, auto&) { blk.diagonal_pairs(w, base); });
      }
    }
    exec([&](const WarpContext& w, auto& s) {
      if (step + 1 < chunks) blk.issue_chunk(w, Block::buffer(step + 1), start_of(step + 1), queries, keys);
      const int64_t left = end - start;
      work(w, s, base, start, static_cast<int>(left < kChunk ? left : kChunk));
    });
  }
}

// The query pass for block `block` ((batch, head[, segment])): writes dq and the row scalars (and,
// kFading, the rows' terms of dL/dc; the problem's log_decay must then be set).
template <int DK, int DV, bool kFading, bool kChannels = false, typename scalar_t, typename Exec>
LINATTN_HD LINATTN_INLINE void run_query_gradient_block(const Exec& exec, const BackwardProblem<scalar_t>& p,
                                                        int64_t block) {
  using Block = BackwardBlock<scalar_t, DK, DV, kFading, kChannels>;
  using L = typename Block::L;
  using State = QueryState<DK, DV>;
  const Block blk(p, block);
  auto publish = [&](const WarpContext& w, const State& s) {
    s.template publish<scalar_t>(w, L::kState, L::kSPitch, L::kStateLow, Block::Scales::publish_scale(w));
  };
  // Sᵀ += Vᵀ φ(K); a fading state: Sᵀ = e^{b_last} Sᵀ + (e^{b_last − b} ⊙ V)ᵀ φ(K); gates per
  // channel: Sᵀ = Sᵀ Diag(e^{G_last}) + Vᵀ (φ(K) ⊙ e^{G_last − G}).
  auto accumulate = [&](const WarpContext& w, State& s, uint32_t base, int rows) {
    blk.fade_state(w, s, base);
    Block::template accumulate<kChannels ? Block::ChannelSide::kFeaturesInY : Block::ChannelSide::kNone>(
        w, s, base + L::kV, L::kVPitch, base + L::kK, L::kQKPitch, rows,
        kFading ? base + L::kKeyFade : Block::kNoFactors);
  };
  auto nothing = [](const WarpContext&, State&, uint32_t) {};
  int64_t q_begin = 0, q_end = 0, k_begin = 0, k_end = 0;
  blk.query_rows(q_begin, q_end);
  blk.key_rows(k_begin, k_end);
  if (q_begin == q_end && k_begin == k_end && p.state_out.data == nullptr) return;  // as the forward's
  // (Two phases: float16's copy is scaled by a size every warp recorded as it loaded its tiles;
  // a size is recorded only where a publish follows: state_scale.h.)
  exec([&](const WarpContext& w, State& s) {
    blk.load_s(w, s);
    Block::Scales::record(w, s);
  });
  exec([&](const WarpContext& w, State& s) { publish(w, s); });
  if (p.causal) {
    // z and the state copy take in the chunk before once every warp has read them.
    stream_chunks(exec, blk, q_begin, q_end, false, true, true,
                  [&](const WarpContext& w, State& s, uint32_t previous) {
                    blk.add_key_sums(w, previous);
                    publish(w, s);
                  },
                  [&](const WarpContext& w, State& s, uint32_t base, int64_t start, int rows) {
                    blk.query_gradient(w, base, start);
                    accumulate(w, s, base, rows);
                    Block::Scales::record(w, s);
                  });
    if (p.state_out.data != nullptr) {
      // The final state: z takes in the last chunk (no chunk after it did), then both are stored.
      const int64_t chunks = (q_end - q_begin + kChunk - 1) / kChunk;
      exec([&](const WarpContext& w, State& s) {
        if (chunks > 0) blk.add_key_sums(w, Block::buffer(chunks - 1));
        blk.store_s(w, s);
      });
    }
    return;
  }
  if (!p.state_complete) {
    stream_chunks(exec, blk, k_begin, k_end, false, false, true, nothing,
                  [&](const WarpContext& w, State& s, uint32_t base, int64_t, int rows) {
                    accumulate(w, s, base, rows);
                    blk.add_key_sums(w, base);
                  });
    exec([&](const WarpContext& w, State& s) { Block::Scales::record(w, s); });
    exec([&](const WarpContext& w, State& s) { publish(w, s); });
  }
  stream_chunks(exec, blk, q_begin, q_end, false, true, false, nothing,
                [&](const WarpContext& w, State&, uint32_t base, int64_t start, int) {
                  blk.query_gradient(w, base, start);
                });
}

// The sequence split's kQuerySums for block `block`: the segment's [Σ φ(k) vᵀ | Σ φ(k)] over its
// key rows (faded to its end under a fading state) to state_out, as the query pass's scan takes
// them. A kernel of its own: beside the query pass's loop it cost that kernel registers.
template <int DK, int DV, bool kFading, bool kChannels = false, typename scalar_t, typename Exec>
LINATTN_HD LINATTN_INLINE void run_query_sums_block(const Exec& exec, const BackwardProblem<scalar_t>& p,
                                                    int64_t block) {
  using Block = BackwardBlock<scalar_t, DK, DV, kFading, kChannels>;
  using L = typename Block::L;
  using State = QueryState<DK, DV>;
  const Block blk(p, block);
  int64_t k_begin = 0, k_end = 0;
  blk.key_rows(k_begin, k_end);
  exec([&](const WarpContext& w, State& s) { blk.load_s(w, s); });
  stream_chunks(exec, blk, k_begin, k_end, false, false, true, [](const WarpContext&, State&, uint32_t) {},
                [&](const WarpContext& w, State& s, uint32_t base, int64_t, int rows) {
                  blk.fade_state(w, s, base);
                  Block::template accumulate<kChannels ? Block::ChannelSide::kFeaturesInY : Block::ChannelSide::kNone>(
                      w, s, base + L::kV, L::kVPitch, base + L::kK, L::kQKPitch, rows,
                      kFading ? base + L::kKeyFade : Block::kNoFactors);
                  blk.add_key_sums(w, base);
                });
  exec([&](const WarpContext& w, State& s) { blk.store_s(w, s); });
}

// The key-value pass for block `block`: writes dk, dv and dS0 (kKeyValueSums: only the segment's
// Σ φ(q) G'ᵀ).
template <int DK, int DV, bool kFading, bool kChannels = false, typename scalar_t, typename Exec>
LINATTN_HD LINATTN_INLINE void run_key_value_gradient_block(const Exec& exec, const BackwardProblem<scalar_t>& p,
                                                            int64_t block) {
  using Block = BackwardBlock<scalar_t, DK, DV, kFading, kChannels>;
  using L = typename Block::L;
  using State = KeyValueState<DK, DV>;
  const Block blk(p, block);
  auto publish = [&](const WarpContext& w, const State& s) {
    s.template publish<scalar_t>(w, L::kState, L::kUPitch, L::kULow, Block::Scales::publish_scale(w));
  };
  // U += φ(Q)ᵀ G'; a fading state: U = e^{b_last} U + (e^{b} ⊙ φ(Q))ᵀ G' (U is faded to the
  // chunk's start, as the scan backwards in time reaches it); gates per channel:
  // U = Diag(e^{G_last}) U + (φ(Q) ⊙ e^G)ᵀ G'.
  auto accumulate = [&](const WarpContext& w, State& s, uint32_t base, int rows) {
    blk.fade_state(w, s, base);
    Block::template accumulate<kChannels ? Block::ChannelSide::kFeaturesInX : Block::ChannelSide::kNone>(
        w, s, base + L::kQ, L::kQKPitch, base + L::kG, L::kGPitch, rows,
        kFading ? base + L::kRowFade : Block::kNoFactors);
  };
  auto accumulate_chunk = [&](const WarpContext& w, State& s, uint32_t base, int64_t, int rows) {
    accumulate(w, s, base, rows);
  };
  auto nothing = [](const WarpContext&, State&, uint32_t) {};
  int64_t q_begin = 0, q_end = 0, k_begin = 0, k_end = 0;
  blk.query_rows(q_begin, q_end);
  blk.key_rows(k_begin, k_end);
  if (q_begin == q_end && k_begin == k_end && p.state_out.data == nullptr) return;  // as the forward's
  // (As the query pass's: a size recorded only where a publish follows. The segments' sums read
  // no copy.)
  const bool publishes = p.pass != BackwardPass::kKeyValueSums;
  exec([&](const WarpContext& w, State& s) {
    blk.load_u(w, s);
    if (publishes) Block::Scales::record(w, s);
  });
  if (publishes) exec([&](const WarpContext& w, State& s) { publish(w, s); });
  if (p.pass == BackwardPass::kKeyValueSums) {
    // (Backwards in time under a fading state: the sum faded to the segment's start.)
    stream_chunks(exec, blk, q_begin, q_end, kFading, true, false, nothing, accumulate_chunk);
  } else if (p.causal) {
    stream_chunks(exec, blk, q_begin, q_end, true, true, true,
                  [&](const WarpContext& w, State& s, uint32_t) { publish(w, s); },
                  [&](const WarpContext& w, State& s, uint32_t base, int64_t start, int rows) {
                    blk.key_value_gradients(w, base, start);
                    accumulate(w, s, base, rows);
                    Block::Scales::record(w, s);
                  });
  } else {
    if (!p.state_complete) {
      stream_chunks(exec, blk, q_begin, q_end, false, true, false, nothing, accumulate_chunk);
      exec([&](const WarpContext& w, State& s) { Block::Scales::record(w, s); });
      exec([&](const WarpContext& w, State& s) { publish(w, s); });
    }
    stream_chunks(exec, blk, k_begin, k_end, false, false, true, nothing,
                  [&](const WarpContext& w, State&, uint32_t base, int64_t start, int) {
                    blk.key_value_gradients(w, base, start);
                  });
  }
  exec([&](const WarpContext& w, State& s) { blk.store_u(w, s); });
}

}  // namespace tensor_core
}  // namespace linattn
