// linear_attn_{fwd,bwd}_fused for CUDA tensors: the fused kernels (fused_cuda_kernels.cu) on the
// tensors' device and current stream. Head dims whose block does not fit in the device's shared
// memory (fp64 with the largest head dims) take the device-generic path instead.
// Compiled only in CUDA builds (setup.py: fused_cuda_* sources).
#include "plain_entry.h"
#include "fused_launch.h"
#include "tensor_core/launch.h"
#include "fused_plans.h"
#include "generic.h"
#include "../common/cuda_device.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

namespace linattn {
namespace {

struct CudaLaunch {
  cudaStream_t stream;
  // The current device's SMs (the tensor-core forward splits long sequences to fill them).
  int64_t processors() const { return multiprocessors(); }
  template <typename scalar_t>
  void operator()(const tensor_core::ForwardProblem<scalar_t>& p) const {
    TORCH_CHECK(p.blocks() <= std::numeric_limits<int32_t>::max(), kLinearAttentionOp,
                ": batch · heads = ", p.blocks(), " exceeds a CUDA grid");
    tensor_core::launch_forward(p, stream);
  }
  template <typename scalar_t>
  void operator()(const tensor_core::BackwardProblem<scalar_t>& p) const {
    TORCH_CHECK(p.blocks() <= std::numeric_limits<int32_t>::max(), kLinearAttentionOp,
                ": batch · heads = ", p.blocks(), " exceeds a CUDA grid");
    tensor_core::launch_backward(p, stream);
  }
  template <typename Problem>
  void operator()(const Problem& p) const {
    TORCH_CHECK(p.blocks() <= std::numeric_limits<int32_t>::max(), kLinearAttentionOp,
                ": batch · heads · value tiles = ", p.blocks(), " exceeds a CUDA grid");
    fused::launch_scan(p, stream);
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& initial_state, const std::optional<at::Tensor>& key_padding_mask,
    int64_t feature_map, bool causal, bool normalize, double eps) {
  const c10::cuda::CUDAGuard guard(q.device());
  auto result = fused::forward(q, k, v, initial_state, key_padding_mask, feature_map, causal, normalize, eps,
                               shared_memory_per_block(), CudaLaunch{c10::cuda::getCurrentCUDAStream().stream()});
  if (result.has_value()) return *result;
  return forward_generic(q, k, v, initial_state, key_padding_mask, feature_map, causal, normalize, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_final_state,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& normalizer, const std::optional<at::Tensor>& initial_state,
    const std::optional<at::Tensor>& key_padding_mask, int64_t feature_map, bool causal,
    bool normalize, const std::optional<at::Tensor>& final_state) {
  const c10::cuda::CUDAGuard guard(q.device());
  auto result = fused::backward(grad_out, grad_final_state, q, k, v, out, normalizer, initial_state,
                                key_padding_mask, feature_map, causal, normalize, final_state,
                                shared_memory_per_block(),
                                CudaLaunch{c10::cuda::getCurrentCUDAStream().stream()});
  if (result.has_value()) return *result;
  return backward_generic(grad_out, grad_final_state, q, k, v, out, normalizer, initial_state,
                          key_padding_mask, feature_map, causal, normalize, final_state);
}

// A fading state and/or packed sequences on the tensor cores, or nothing where they do not take the call.
std::optional<std::tuple<at::Tensor, at::Tensor, at::Tensor>> extended_forward_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& initial_state, const std::optional<at::Tensor>& key_padding_mask,
    int64_t feature_map, bool causal, bool normalize, double eps, const std::optional<at::Tensor>& log_decay,
    const std::optional<at::Tensor>& cu_seqlens) {
  const c10::cuda::CUDAGuard guard(q.device());
  return fused::forward(q, k, v, initial_state, key_padding_mask, feature_map, causal, normalize, eps,
                        shared_memory_per_block(), CudaLaunch{c10::cuda::getCurrentCUDAStream().stream()}, log_decay,
                        cu_seqlens);
}

// Their backward, or nothing where the tensor cores do not take the call.
std::optional<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>> extended_backward_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_final_state, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& normalizer,
    const std::optional<at::Tensor>& initial_state, const std::optional<at::Tensor>& key_padding_mask,
    int64_t feature_map, bool causal, bool normalize, const std::optional<at::Tensor>& final_state,
    const std::optional<at::Tensor>& log_decay, const std::optional<at::Tensor>& cu_seqlens) {
  const c10::cuda::CUDAGuard guard(q.device());
  return fused::extended_backward(grad_out, grad_final_state, q, k, v, out, normalizer, initial_state,
                                   key_padding_mask, feature_map, causal, normalize, final_state, log_decay, cu_seqlens,
                                   shared_memory_per_block(), CudaLaunch{c10::cuda::getCurrentCUDAStream().stream()});
}

constexpr char kImplementation[] = "fused CUDA kernels";

}  // namespace

TORCH_LIBRARY_IMPL(linattn, CUDA, m) {
  m.impl("linear_attn_fwd_fused", &fused_forward<&forward_cuda, &extended_forward_cuda>);
  m.impl("linear_attn_bwd_fused", &fused_backward<&backward_cuda, &extended_backward_cuda, kImplementation>);
}

}  // namespace linattn
