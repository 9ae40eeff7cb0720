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
// kWarps sizes to the same σ (`choose`) and keeps it in its own slot for its products (`of`),
// where the next `choose` only writes after another barrier.
#pragma once

#include "problem.h"
#include "../../common/warp/scan.h"

namespace linattn {
namespace tensor_core {

constexpr float kStateCopyLimit = 32768.0f;  // below float16's 65504 after rounding

template <typename scalar_t>
inline constexpr bool kStateCopyScaled = std::is_same_v<scalar_t, c10::Half>;

// Shared memory: kWarps fp32 sizes, then kWarps scales, from offset `origin` (a layout's
// kStateScales, kStateScaleBytes).
struct StateScales {
  template <typename State>
  LINATTN_HD static void record(const WarpContext& w, const State& s, uint32_t origin) {
    Lanes<float> size;
    s.largest(w, size);
    size = warp::butterfly<warp::kWarpSize>(w, size, [](float mine, float other) { return ::fmaxf(mine, other); });
    warp::for_lanes(w, [&](int lane) {
      if (lane == 0) warp::store_shared<float>(w, origin + static_cast<uint32_t>(w.warp * 4), size[lane]);
    });
  }

  // σ for the state (1 / σ is what its copy is published with).
  LINATTN_HD static float choose(const WarpContext& w, uint32_t origin) {
    float size = 0.0f;
    LINATTN_UNROLL
    for (int i = 0; i < kWarps; ++i) size = ::fmaxf(size, warp::load_shared<float>(w, origin + i * 4));
    const float sigma = warp::power_of_two_above(size, kStateCopyLimit);
    warp::for_lanes(w, [&](int lane) {
      if (lane == 0) warp::store_shared<float>(w, origin + static_cast<uint32_t>((kWarps + w.warp) * 4), sigma);
    });
    return sigma;
  }

  LINATTN_HD static float of(const WarpContext& w, uint32_t origin) {
    return warp::load_shared<float>(w, origin + static_cast<uint32_t>((kWarps + w.warp) * 4));
  }
};

}  // namespace tensor_core
}  // namespace linattn
