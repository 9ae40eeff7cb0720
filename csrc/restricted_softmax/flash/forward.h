// The flash engine's forward (bf16 and fp16 inputs, fp32 accumulation): softmax attention under
// any restricted pattern (docs/methods.md §5–§7), written once against the warp-operation layer
// (common/warp/) for the GPU and its CPU emulation.
//
// One block of 4 warps owns 64 query rows of one (batch, head), 16 rows a warp, and visits only
// the key tiles (64 keys) its rows can see: the window's band, computed here, or the list the
// plan (plan.h) made on the device for a layout; then tiles of gathered global keys (Longformer;
// the global rows are blocks of their own); tiles of other documents (segment ids) are skipped.
// Per key tile:
//   S = scale · Q Kᵀ on tensor cores; where the tile is only partly visible, −inf for the hidden
//       pairs (per pair, visibility.h); the bias added, kSelfScore for fixed pairs;
//   online softmax in fp32 registers (running row maximum and sum), O rescaled;
//   O += P V on tensor cores, P packed to 16 bits straight from the score accumulators.
// The rows' outputs and logsumexp are written once at the end. The next key tile is in flight
// (cp.async, double-buffered) while the current one computes; a single-buffered block (D = 256
// where two buffers do not fit, Layout) issues it once every warp is done with the current one.
#pragma once

#include "forward_block.h"

namespace linattn {
namespace flash {

// The block program. `exec(phase)` runs phase(warp context, warp state) for every warp of the
// block, then waits for all of them (a barrier).
template <int D, int Buffers, typename scalar_t, typename Exec>
LINATTN_HD void run_forward_block(const Exec& exec, const FlashProblem<scalar_t>& p, int64_t block) {
  using Block = FlashBlock<scalar_t, D, Buffers>;
  using State = WarpState<D>;
  const Block blk(p, block);
  const int64_t visits = blk.visits.count();
  exec([&](const WarpContext& w, State& s) {
    Block::start(w, s);
    if (visits > 0) {
      blk.issue_queries(w);
      blk.issue_keys(w, 0);  // commits the queries too
    }
  });
  for (int64_t n = 0; n < visits; ++n) {
    exec([&](const WarpContext& w, State&) { blk.prepare_keys(w, n); });
    exec([&](const WarpContext& w, State& s) {
      if (Buffers == 2 && n + 1 < visits) blk.issue_keys(w, n + 1);
      blk.attend(w, s, n);
    });
    if (Buffers == 1 && n + 1 < visits) exec([&](const WarpContext& w, State&) { blk.issue_keys(w, n + 1); });
  }
  exec([&](const WarpContext& w, State& s) { blk.finish(w, s); });
}

}  // namespace flash
}  // namespace linattn
