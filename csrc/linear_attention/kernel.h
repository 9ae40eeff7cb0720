// Kernel interface of the linear attention family: raw pointers, strides and sizes only, so
// the math does not depend on ATen's Tensor class.
//
// The state is kept augmented: S' = [S | z] with shape (m, dv + 1), which is what the kernels
// get when every value row is extended by a trailing 1. Then q·S' yields the numerator and the
// normalizer in one product, and the backward treats both the same way.
#pragma once

#include "../common/strided.h"

#include <cstdint>

namespace linattn {

// Feature maps the kernels apply themselves while loading q and k (the op's `feature_map`).
// Fusing them saves two feature-mapped copies of q and k and their separate passes.
enum FeatureMap : int64_t { kFeatureIdentity = 0, kFeatureElu = 1, kFeatureRelu = 2 };

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
};

// acc_t is float for float/half/bfloat16 inputs and double for double inputs. Every acc_t
// buffer is contiguous: states (B, H, m, dv + 1), normalizers (B, H, N). key_padding_mask is
// contiguous (B, M), true = padded key (φ(k_j) := 0), or null.
template <typename scalar_t, typename acc_t>
void linear_attention_forward_cpu(const LinearAttentionShape& shape,
                                  Strided4<const scalar_t> q, Strided4<const scalar_t> k,
                                  Strided4<const scalar_t> v, const bool* key_padding_mask,
                                  const acc_t* initial_state,  // nullable
                                  scalar_t* out,               // contiguous (B, H, N, dv)
                                  acc_t* final_state, acc_t* normalizer);

template <typename scalar_t, typename acc_t>
void linear_attention_backward_cpu(const LinearAttentionShape& shape,
                                   Strided4<const scalar_t> grad_out, Strided4<const scalar_t> q,
                                   Strided4<const scalar_t> k, Strided4<const scalar_t> v,
                                   Strided4<const scalar_t> out, const acc_t* normalizer,
                                   const bool* key_padding_mask,   // nullable
                                   const acc_t* initial_state,     // nullable
                                   const acc_t* grad_final_state,  // nullable
                                   scalar_t* grad_q, scalar_t* grad_k, scalar_t* grad_v,  // contiguous
                                   acc_t* grad_initial_state);

}  // namespace linattn
