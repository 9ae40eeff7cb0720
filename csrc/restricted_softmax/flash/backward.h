// The flash engine's backward (bf16 and fp16, head dims up to 256): FlashAttention-2's gradients
// recomputed from the forward's logsumexp, in two launches that write every gradient once (no
// atomics, deterministic; only grad_bias, summed over the batch, adds atomically):
//   key blocks   (64 keys, resident K and V; visit the query tiles that see them):
//                Sᵀ = scale·K Qᵀ, Pᵀ = exp(Sᵀ − lse), dPᵀ = V dOᵀ, dSᵀ = Pᵀ ⊙ (dPᵀ − delta),
//                dV += Pᵀ dO, dK += scale · dSᵀ Q;
//   query blocks (64 queries, resident Q and dO; visit the key tiles they see, as the forward):
//                S, P, dP = dO Vᵀ and dS again, dQ += scale · dS K (and grad_bias += dS).
// With forget gates each block also sums σ·dS over its own rows' pairs (keys: over the queries
// that see them; queries: over the keys they see) and writes the sum once per token (plan.h adds
// the two parts).
// delta = Σ_c dO·O − grad_lse per row is computed before (plan.h). Hidden pairs have P = 0 and
// dS = 0; fixed pairs (shared-QK positions) have P but dS = 0. The pattern's visits are the
// forward's: the window's band (transposed for key blocks) or the plan and its transpose.
// Recomputing S and dP in both launches costs 7 products per tile pair instead of FA-2's 5 with
// atomic dQ; the streamed tiles are double-buffered (cp.async) as in the forward (or single-
// buffered where two buffers do not fit, as the forward's). At D = 256 a block has 8 warps, two per
// 16 rows, each accumulating half of the gradients' columns (BackwardShape, backward_block.h).
#pragma once

#include "backward_block.h"

namespace linattn {
namespace flash {

// The block program of either kind (KeyBlock or QueryBlock). `exec(phase)` runs phase(warp
// context, warp state) for every warp of the block, then waits for all of them (a barrier).
template <typename Block, typename scalar_t, typename Exec>
LINATTN_HD void run_backward_block(const Exec& exec, const FlashProblem<scalar_t>& p,
                                   const FlashGradients<scalar_t>& g, int64_t index) {
  using State = typename Block::State;
  const Block blk(p, g, index);
  const int64_t visits = blk.visits.count();
  exec([&](const WarpContext& w, State& s) {
    warp::clear(w, s.first);
    warp::clear(w, s.second);
    warp::for_lanes(w, [&](int lane) { s.forget[0][lane] = s.forget[1][lane] = 0.0f; });
    if (visits == 0) return;
    blk.issue_resident(w, s);
    blk.issue(w, 0);  // commits the resident rows too
  });
  for (int64_t n = 0; n < visits; ++n) {
    exec([&](const WarpContext& w, State&) { warp::cp_async_wait<0>(w); });
    exec([&](const WarpContext& w, State& s) {
      if (Block::kBuffers == 2 && n + 1 < visits) blk.issue(w, n + 1);
      blk.attend(w, s, n);
    });
    // One buffer: the next tile once every warp is done with this one.
    if (Block::kBuffers == 1 && n + 1 < visits) exec([&](const WarpContext& w, State&) { blk.issue(w, n + 1); });
  }
  exec([&](const WarpContext& w, State& s) { blk.finish(w, s); });
}

}  // namespace flash
}  // namespace linattn
