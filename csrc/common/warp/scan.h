// Reductions and prefix sums across a warp's lanes on the warp-operation layer (shuffles): what
// the tensor-core kernels use for a chunk's cumulative log factors (linear attention's fading
// state, the delta rule's gates), row norms and a chunk's first flagged row.
#pragma once

#include "warp_ops.h"

namespace linattn {
namespace warp {

// x combined over each group of kGroup neighbouring lanes (a power of two), the result in every
// lane of the group: a butterfly of shuffles, partners lane ^ kGroup / 2, then ^ kGroup / 4, ...
// `combine(mine, partner's)` is associative and commutative (a sum, a minimum).
template <int kGroup, typename Combine>
LINATTN_HD inline Lanes<float> butterfly(const WarpContext& w, Lanes<float> x, const Combine& combine) {
  LINATTN_UNROLL
  for (int mask = kGroup / 2; mask > 0; mask /= 2) {
    Lanes<int> partner;
    for_lanes(w, [&](int lane) { partner[lane] = lane ^ mask; });
    const Lanes<float> other = shuffle(w, x, partner);
    for_lanes(w, [&](int lane) { x[lane] = combine(x[lane], other[lane]); });
  }
  return x;
}

// Inclusive prefix sums of 64 values held in two halves (x[half][lane] is value 32·half + lane):
// each half by shuffles, then the first half's total added to the second. Returns the total of
// all 64 in every lane.
LINATTN_HD inline Lanes<float> inclusive_scan_64(const WarpContext& w, Lanes<float> (&x)[2]) {
  LINATTN_UNROLL
  for (int half = 0; half < 2; ++half) {
    LINATTN_UNROLL
    for (int offset = 1; offset < kWarpSize; offset *= 2) {
      Lanes<int> source;
      for_lanes(w, [&](int lane) { source[lane] = lane >= offset ? lane - offset : lane; });
      const Lanes<float> earlier = shuffle(w, x[half], source);
      for_lanes(w, [&](int lane) {
        if (lane >= offset) x[half][lane] += earlier[lane];
      });
    }
  }
  Lanes<int> last;
  for_lanes(w, [&](int lane) { last[lane] = kWarpSize - 1; });
  const Lanes<float> first_total = shuffle(w, x[0], last);
  for_lanes(w, [&](int lane) { x[1][lane] += first_total[lane]; });
  return shuffle(w, x[1], last);
}

}  // namespace warp
}  // namespace linattn
