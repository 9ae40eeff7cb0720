// The delta rule's tensor-core backward walk (the gradient of the tensor-core forward,
// fused_backward.h): the one part of the chunkwise backward that is sequential over the chunks,
// on tensor cores. Per chunk n, in reverse, with dS the gradient of the state leaving the chunk
// (docs/methods.md §11; cpu_kernel_impl.h's chunk_backward says the same steps on the CPU):
//   du  = diag(e^{G_last − G}) K dS + scale · (Q Kᵀ ⊙ Γ ⊙ lower)ᵀ dO       (dO: grad_out's rows)
//   dS ← e^{G_last} dS − Wᵀ du + scale · Qᵀ diag(e^G) dO,   Wᵀ du = Kᵀ (Twᵀ du)
// (non-causal: without the dO terms; the host adds scale · Qᵀ dO to the final state's gradient).
// It writes dS leaving every chunk and du (fp32) for the products that are parallel over chunks
// (batched on the host), and dS entering the first chunk (grad_initial_state).
//
// One block of 8 warps per (batch, head, 64 value columns): du, dS and the state's gradient are
// separable by value column. The block reuses the forward's (forward_block.h): the same row
// buffers with grad_out in V's place, the gates, the normalisation and T = (I + A)⁻¹ with its
// 16-bit form Tw = T diag(β e^G) (W = Tw K); dS lives in the accumulator registers as S does
// there, its 16-bit copy in S's place. Shared memory adds Y = −Twᵀ du.
//
// Gates per key channel (kChannels; forward_block.h): du = (K ⊙ e^{G_last − G}) dS + scale ·
// (Pᵀ ⊙ upper) dO with the pair weights P, dS ← Diag(e^{G_last}) dS + (K ⊙ e^G)ᵀ Y +
// scale · (Q ⊙ e^G)ᵀ dO, and Tw = T diag(β) (W = Tw (K ⊙ e^G)).
#pragma once

#include "forward_block.h"
#include "../../linear_attention/tensor_core/backward_block.h"  // masked_scores

namespace linattn {
namespace delta_tensor_core {

template <typename scalar_t, int DK, bool kChannels = false>
struct DeltaBackwardWalkBlock : DeltaForwardBlock<scalar_t, DK, kWalkValueTile, /*kKeep=*/true, kChannels> {
  using Base = DeltaForwardBlock<scalar_t, DK, kWalkValueTile, true, kChannels>;
  using L = DeltaWalkLayout<DK, kChannels>;
  using Base::kColsPerHalf;
  using Base::half_tile;
  using Base::gate_sum;
  using Base::p;
  using Base::row_value;
  using State = typename Base::State;  // dS: DeltaState<DK, 64>

  LINATTN_HD DeltaBackwardWalkBlock(const DeltaForwardProblem<scalar_t>& problem, int64_t index)
      : Base(problem, index) {}

  // Rows 16·rb.. of du for the warp's half of the value columns (warp w: rb = w % 4, half w / 4),
  // the chunk's rows from `start` of the sequence, to kU (16-bit) and chunk_values (fp32).
  LINATTN_HD void pseudo_gradients(const WarpContext& w, uint32_t base, int64_t start) const {
    const int rb = w.warp % 4, ch = w.warp / 4;
    Accumulator du[kColsPerHalf][4];
    warp::clear(w, du);
    LINATTN_UNROLL
    for (int ks = 0; ks < DK / 16; ++ks) {  // K_rb dS
      Fragment kf[4];
      warp::rows_as_a_operand(w, base + L::kK + rb * 16 * L::kQKPitch + ks * 32, L::kQKPitch, kf);
      if constexpr (kChannels) {  // K ⊙ e^{G_last − G}
        warp::scale_a_operand<scalar_t>(w, kf, [&](int r, int c) {
          return warp::exp_of(gate_sum(w, kChunk - 1, ks * 16 + c) - gate_sum(w, rb * 16 + r, ks * 16 + c));
        });
      }
      LINATTN_UNROLL
      for (int j = 0; j < kColsPerHalf; ++j) {
        Fragment bf[2];
        Base::state_fragment(w, ks, half_tile(ch, j), bf);
        warp::mma_16816<scalar_t>(du[j], kf, bf);
      }
    }
    if (this->gated() && !kChannels) {
      warp::each_accumulator(w, du, [&](int r, int, float& x) { x *= row_value(w, L::kDecay, rb * 16 + r); });
    }
    if (p.causal) {
      // Key i of the chunk (row) against the later queries j >= i (columns): scale · k_i·q_j · e^{G_j − G_i}.
      Fragment scores[kChunk / 16][4];
      const bool gated = this->gated();
      const float scale = p.scale;
      if constexpr (kChannels) {
        channel_scores(w, base, scores);
      } else {
        tensor_core::BackwardBlock<scalar_t, DK, kWalkValueTile>::template masked_scores<DK / 16>(
            w, base + L::kK, L::kQKPitch, base + L::kQ, L::kQKPitch, /*reverse=*/true,
            [&](int row, int col, float x) {
              x *= scale;
              return gated ? x * warp::exp_of(row_value(w, L::kG, col) - row_value(w, L::kG, row)) : x;
            },
            scores);
      }
      LINATTN_UNROLL
      for (int kk = 0; kk < kChunk / 16; ++kk) {
        if (kk < rb) continue;
        LINATTN_UNROLL
        for (int j = 0; j < kColsPerHalf; ++j) {
          Fragment bf[2];
          warp::rows_as_b_operand(w, base + L::kV + kk * 16 * L::kVPitch + half_tile(ch, j) * 16, L::kVPitch, bf);
          warp::mma_16816<scalar_t>(du[j], scores[kk], bf);
        }
      }
    }
    this->store_row_tiles(w, du, L::kU, 1.0f, start);
  }

  // Gates per key channel: the scores above as A fragments, scale · P_ji for the queries j >= i of
  // key i, their pair weights by pair_block above the diagonal blocks and from diagonal_pairs' Dᵀ in
  // them (masked_scores' order: a 16-column block at a time).
  LINATTN_HD void channel_scores(const WarpContext& w, uint32_t base, Fragment (&scores)[kChunk / 16][4]) const {
    const int rb = w.warp % 4;
    LINATTN_UNROLL
    for (int kk = 0; kk < kChunk / 16; ++kk) {
      Accumulator sc[2][4];
      warp::clear(w, sc);
      if (kk > rb) this->pair_block(w, sc, 0, base + L::kK, rb, base + L::kQ, kk);
      warp::each_accumulator(w, sc, [&](int r, int c, float& x) {
        const int row = rb * 16 + r, col = kk * 16 + c;
        if (col < row) {
          x = 0.0f;
        } else {
          x = p.scale * (kk == rb ? Base::square(w, L::kA, col, row) : x);
        }
      });
      Fragment block[1][4];
      warp::as_a_fragments<scalar_t>(w, sc, block);
      LINATTN_UNROLL
      for (int i = 0; i < 4; ++i) scores[kk][i] = block[0][i];
    }
  }

  // Rows 16·rb.. of Y = −Twᵀ du (Tw lower triangular: the blocks kk >= rb of du), 16-bit, to kY.
  LINATTN_HD void through_transform(const WarpContext& w) const {
    const int rb = w.warp % 4, ch = w.warp / 4;
    Accumulator y[kColsPerHalf][4];
    warp::clear(w, y);
    LINATTN_UNROLL
    for (int kk = 0; kk < kChunk / 16; ++kk) {
      if (kk < rb) continue;
      Fragment a[4];  // Twᵀ's block (rb, kk): Tw's block (kk, rb) read transposed
      warp::rows_as_a_operand_transposed(w, L::kTw + kk * 16 * L::kTPitch + rb * 32, L::kTPitch, a);
      LINATTN_UNROLL
      for (int j = 0; j < kColsPerHalf; ++j) {
        Fragment bf[2];
        warp::rows_as_b_operand(w, L::kU + kk * 16 * L::kVPitch + half_tile(ch, j) * 16, L::kVPitch, bf);
        warp::mma_16816<scalar_t>(y[j], a, bf);
      }
    }
    this->store_row_tiles(w, y, L::kY, -1.0f, -1);
  }

  // dS ← e^{G_last} dS + Kᵀ Y (+ scale · Qᵀ diag(e^G) dO, causal) over the chunk's `keys` rows.
  LINATTN_HD void update_gradient(const WarpContext& w, State& s, uint32_t base, int keys) const {
    this->fade_state(w, s);
    if constexpr (kChannels) {  // (K ⊙ e^G)ᵀ Y + scale · (Q ⊙ e^G)ᵀ dO
      const auto faded = [&](float multiplier) {
        return [&w, multiplier](int row, int c) { return multiplier * warp::exp_of(gate_sum(w, row, c)); };
      };
      this->add_to_state_with(w, s, base + L::kK, true, faded(1.0f), L::kY, keys);
      if (p.causal) this->add_to_state_with(w, s, base + L::kQ, true, faded(p.scale), base + L::kV, keys);
      return;
    }
    this->add_to_state(w, s, base + L::kK, Base::kNoFactors, 1.0f, L::kY, keys);
    if (p.causal) {
      this->add_to_state(w, s, base + L::kQ, this->gated() ? L::kExpG : Base::kNoFactors, p.scale, base + L::kV, keys);
    }
  }
};

// The block program: dS from grad_final_state (state_in; zeros without one) through the chunks in
// reverse, into grad_initial_state (state_out).
template <int DK, bool kChannels = false, typename scalar_t, typename Exec>
LINATTN_HD LINATTN_INLINE void run_delta_backward_walk_block(const Exec& exec, const DeltaForwardProblem<scalar_t>& p,
                                                             int64_t block) {
  using Block = DeltaBackwardWalkBlock<scalar_t, DK, kChannels>;
  using State = DeltaState<DK, kWalkValueTile>;
  const Block blk(p, block);
  const int64_t chunks = blk.chunks();

  exec([&](const WarpContext& w, State& s) {
    blk.load_state(w, s);
    blk.publish_state(w, s);
    if (chunks > 0) blk.issue_chunk(w, 0, (chunks - 1) * kChunk, p.causal, true);
  });
  for (int64_t step = 0; step < chunks; ++step) {
    const int64_t chunk = chunks - 1 - step, start = chunk * kChunk;
    const uint32_t base = Block::buffer(step);
    const int rows = static_cast<int>(blk.rows - start < kChunk ? blk.rows - start : kChunk);
    exec([&](const WarpContext& w, State& s) {
      if (step > 0) blk.publish_state(w, s);  // every warp has read the previous dS
      blk.store_chunk_state(w, s, chunk);      // dS leaving the chunk
      warp::cp_async_wait<0>(w);
      if (chunk > 0) blk.issue_chunk(w, step + 1, start - kChunk, p.causal, true);
      blk.load_gates(w, start, /*screen=*/false);
    });
    prepare_chunk<State>(exec, blk, base, start, p.causal, /*screen=*/false);
    exec([&](const WarpContext& w, State&) { blk.pseudo_gradients(w, base, start); });
    exec([&](const WarpContext& w, State&) { blk.through_transform(w); });
    exec([&](const WarpContext& w, State& s) { blk.update_gradient(w, s, base, rows); });
  }
  exec([&](const WarpContext& w, State& s) { blk.store_state(w, s); });
}

}  // namespace delta_tensor_core
}  // namespace linattn
