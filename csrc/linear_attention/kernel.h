// Kernel interface of the linear attention family: raw pointers, strides and sizes only, so
// the math does not depend on ATen's Tensor class.
//
// The state is kept augmented: S' = [S | z] with shape (m, dv + 1), which is what the kernels
// get when every value row is extended by a trailing 1. Then q·S' yields the numerator and the
// normalizer in one product, and the backward treats both the same way.
#pragma once

#include "../common/cpu_isa.h"
#include "../common/strided.h"
#include "feature_map.h"

#include <cstdint>

namespace linattn {

struct LinearAttentionShape {
  int64_t batch = 0;
  int64_t heads = 0;
  int64_t q_len = 0;        // N
  int64_t k_len = 0;        // M (== N when causal)
  int64_t feature_dim = 0;  // m
  int64_t value_dim = 0;    // dv; states are (m, dv + 1)
  FeatureMap feature_map = kFeatureIdentity;  // φ, applied to q and k
  bool causal = false;
  bool normalize = true;
  double eps = 1e-6;
  // Rows between consecutive (batch, head) pairs in the contiguous buffers indexed per row
  // (out, normalizer, log_decay and the gradients): q_len / k_len, except for one sequence of a
  // packed batch, whose rows sit inside the (1, H, total, ·) buffers of all of them.
  int64_t q_pitch = 0;
  int64_t k_pitch = 0;
  // Log factors per row of a fading state (log_decay): 1 per token, or feature_dim per token
  // (per-channel gates, GLA: row c of the state fades by its own factor).
  int64_t decay_width = 1;
};

// The entry points of each instruction-set build of the kernels (cpu_kernel_impl.h); the
// operators call the one the CPU runs best through LINATTN_CPU_ISA_DISPATCH.
namespace cpu_base {
#include "cpu_entry_points.inc"
}  // namespace cpu_base
namespace cpu_avx2 {
#include "cpu_entry_points.inc"
}  // namespace cpu_avx2
namespace cpu_avx512 {
#include "cpu_entry_points.inc"
}  // namespace cpu_avx512

}  // namespace linattn
