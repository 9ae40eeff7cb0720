// float16's 16-bit state copies (docs/guide/cuda.md, "float16's range"). The products read the
// fp32 state through a 16-bit copy; float16's range ends at 65504, which a long sequence's state
// passes (z, the normalizer's column, grows about 1.16 a token with elu+1 features, and S as
// fast where the values have a mean). So in float16 the copy holds St / σ, σ the smallest power of
// two that keeps the state's largest element within kStateCopyLimit (1 until it passes it, and
// where the state holds Inf or NaN), and the products that read it multiply their fp32 results
// by σ: division and multiplication by a power of two are exact, so the copy is the one float16
// would hold had its range no end (short of its subnormals). bfloat16's range is fp32's: its
// kernels compile none of this.
//
// σ is one for the whole state, so it needs every warp's tiles: each warp records its largest
// |x| once its state changed (`record`), and after the next barrier each warp reduces the
// kWarps sizes to the same σ (`publish_scale`) and keeps it in its own slot for its products
// (`of`), where the next `publish_scale` only writes after another barrier. Only an update
// followed by a publish records: the passes that never publish after an update (the forward's
// segment states, the key-value pass's segment sums) skip the reduction, and a non-causal
// accumulation records once, after its last chunk.
#pragma once

#include "problem.h"
#include "../../common/warp/scan.h"

namespace linattn {
namespace tensor_core {

constexpr float kStateCopyLimit = 32768.0f;  // below float16's 65504 after rounding

template <typename scalar_t>
inline constexpr bool kStateCopyScaled = std::is_same_v<scalar_t, c10::Half>;

// The slots of a block whose layout puts them at `kOrigin` (kStateScales; kStateScaleBytes):
// kWarps fp32 sizes, then kWarps scales. Every helper is a no-op (σ = 1) but in float16.
template <typename scalar_t, uint32_t kOrigin>
struct StateScales {
  static constexpr bool kScaled = kStateCopyScaled<scalar_t>;

  // The warp's largest state element, once the state changed and only where a copy is published
  // after the next barrier (before it: a barrier).
  template <typename State>
  LINATTN_HD static void record(const WarpContext& w, const State& s) {
    if constexpr (kScaled) {
      Lanes<float> size;
      s.largest(w, size);
      size = warp::butterfly<warp::kWarpSize>(w, size, [](float mine, float other) { return ::fmaxf(mine, other); });
      warp::for_lanes(w, [&](int lane) {
        if (lane == 0) warp::store_shared<float>(w, kOrigin + static_cast<uint32_t>(w.warp * 4), size[lane]);
      });
    }
  }

  // 1 / σ, what the copy is published with: σ chosen from every warp's size and kept in the warp's
  // own slot for its products.
  LINATTN_HD static float publish_scale(const WarpContext& w) {
    if constexpr (kScaled) {
      float size = 0.0f;
      LINATTN_UNROLL
      for (int i = 0; i < kWarps; ++i) size = ::fmaxf(size, warp::load_shared<float>(w, kOrigin + i * 4));
      const float sigma = warp::power_of_two_above(size, kStateCopyLimit);
      warp::for_lanes(w, [&](int lane) {
        if (lane == 0) warp::store_shared<float>(w, kOrigin + static_cast<uint32_t>((kWarps + w.warp) * 4), sigma);
      });
      return 1.0f / sigma;
    }
    return 1.0f;
  }

  // σ of the copy the products read.
  LINATTN_HD static float of(const WarpContext& w) {
    if constexpr (kScaled) return warp::load_shared<float>(w, kOrigin + static_cast<uint32_t>((kWarps + w.warp) * 4));
    return 1.0f;
  }

  // A product of the copy brought back to the state's scale.
  template <int kTiles>
  LINATTN_HD static void unscale(const WarpContext& w, Accumulator (&o)[kTiles][4]) {
    if constexpr (kScaled) {
      const float sigma = of(w);
      warp::each_accumulator(w, o, [&](int, int, float& x) { x *= sigma; });
    }
  }
};

}  // namespace tensor_core
}  // namespace linattn
