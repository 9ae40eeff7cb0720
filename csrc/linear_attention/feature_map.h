// The feature maps φ the linear attention kernels apply while loading q and k (the operators'
// `feature_map` code). Fusing them saves two feature-mapped copies of q and k and their passes.
#pragma once

#include <cstdint>

namespace linattn {

enum FeatureMap : int64_t { kFeatureIdentity = 0, kFeatureElu = 1, kFeatureRelu = 2 };

}  // namespace linattn
