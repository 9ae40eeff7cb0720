// When the tensor-core forward (forward.h) runs, and the problem it is given. Shared by the CUDA
// launch (fused_cuda_ops.cpp) and the CPU emulation (fused_emulated.cpp) through fused_plans.h.
#pragma once

#include "forward.h"
#include "../kernel.h"
#include "../../common/tensor_views.h"

#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>

namespace linattn {
namespace tensor_core {

// LINATTN_TENSOR_CORES=0 keeps bf16/fp16 on the SIMT kernels (comparisons, benchmarks).
inline bool enabled() {
  const char* text = std::getenv("LINATTN_TENSOR_CORES");
  return text == nullptr || std::strcmp(text, "0") != 0;
}

// Whether the tensor-core forward takes this call: 16-bit inputs, head dims up to 128, and its
// shared memory fits in what a block may have.
inline bool takes(const LinearAttentionShape& s, at::ScalarType dtype, int64_t max_shared_bytes) {
  if (dtype != at::kBFloat16 && dtype != at::kHalf) return false;
  if (s.feature_dim > 128 || s.value_dim > 128 || !enabled()) return false;
  return shared_bytes_of(s.feature_dim, s.value_dim) <= max_shared_bytes;
}

// Whether 8 columns of every row of t load as one aligned 16-byte copy.
template <typename scalar_t>
bool vector_rows(const at::Tensor& t) {
  if (t.stride(3) != 1 && t.size(3) > 1) return false;
  for (int d = 0; d < 3; ++d)
    if (t.stride(d) % 8 != 0 && t.size(d) > 1) return false;
  return reinterpret_cast<uintptr_t>(t.const_data_ptr<scalar_t>()) % 16 == 0;
}

// The forward's problem; q, k, v of any strides, outputs contiguous.
template <typename scalar_t>
ForwardProblem<scalar_t> forward_problem(const LinearAttentionShape& s, const at::Tensor& q, const at::Tensor& k,
                                         const at::Tensor& v, const bool* key_padding,
                                         fused::StateView<const float> state_in, fused::StateView<float> state_out,
                                         at::Tensor& out, at::Tensor& normalizer) {
  ForwardProblem<scalar_t> p;
  p.batch = s.batch;
  p.heads = s.heads;
  p.q_len = s.q_len;
  p.k_len = s.k_len;
  p.feature_dim = s.feature_dim;
  p.value_dim = s.value_dim;
  p.feature_map = static_cast<int>(s.feature_map);
  p.normalize = s.normalize;
  p.causal = s.causal;
  p.eps = static_cast<float>(s.eps);
  p.q = view_of<scalar_t>(q);
  p.k = view_of<scalar_t>(k);
  p.v = view_of<scalar_t>(v);
  p.q_vector = vector_rows<scalar_t>(q);
  p.k_vector = vector_rows<scalar_t>(k);
  p.v_vector = vector_rows<scalar_t>(v);
  p.key_padding = key_padding;
  p.state_in = state_in;
  p.state_out = state_out;
  p.out = out.data_ptr<scalar_t>();
  p.normalizer = normalizer.data_ptr<float>();
  return p;
}

}  // namespace tensor_core
}  // namespace linattn
