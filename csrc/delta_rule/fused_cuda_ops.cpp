// delta_rule_fwd_fused and delta_rule_bwd_fused for CUDA tensors: the tensor-core kernels
// (tensor_core/forward.h, backward_walk.h) on the tensors' device and current stream; calls they
// do not take run the device-generic path.
// Compiled only in CUDA builds (setup.py: *cuda* sources).
#include "fused.h"
#include "fused_backward.h"
#include "tensor_core/launch.h"
#include "../common/cuda_device.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

namespace linattn {
namespace {

struct CudaLaunch {
  cudaStream_t stream;
  int64_t processors() const { return multiprocessors(); }
  template <typename scalar_t>
  void operator()(const delta_tensor_core::DeltaForwardProblem<scalar_t>& p) const {
    check_grid(p.blocks());
    delta_tensor_core::launch_forward(p, stream);
  }
  template <typename scalar_t>
  void forward_keeping(const delta_tensor_core::DeltaForwardProblem<scalar_t>& p) const {
    check_grid(p.blocks());
    delta_tensor_core::launch_forward_keeping(p, stream);
  }
  template <typename scalar_t>
  void backward_walk(const delta_tensor_core::DeltaForwardProblem<scalar_t>& p) const {
    check_grid(p.blocks());
    delta_tensor_core::launch_backward_walk(p, stream);
  }
  static void check_grid(int64_t blocks) {
    TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), kDeltaRuleOp,
                ": batch · heads · value tiles = ", blocks, " exceeds a CUDA grid");
  }
};

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                const at::Tensor& beta, const std::optional<at::Tensor>& log_gate,
                                                const std::optional<at::Tensor>& initial_state,
                                                const std::optional<at::Tensor>& cu_seqlens, bool causal,
                                                double scale, bool normalize_qk) {
  const c10::cuda::CUDAGuard guard(q.device());
  auto result = delta_fused::forward(q, k, v, beta, log_gate, initial_state, cu_seqlens, causal, scale, normalize_qk,
                                     shared_memory_per_block(), CudaLaunch{c10::cuda::getCurrentCUDAStream().stream()});
  if (result.has_value()) return *result;
  return delta_fused::forward_elsewhere(q, k, v, beta, log_gate, initial_state, cu_seqlens, causal, scale,
                                        normalize_qk);
}

delta_fused::Gradients backward_cuda(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_final_state,
                                     const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& beta, const std::optional<at::Tensor>& log_gate,
                                     const std::optional<at::Tensor>& initial_state,
                                     const std::optional<at::Tensor>& cu_seqlens, bool causal, double scale,
                                     bool normalize_qk) {
  const c10::cuda::CUDAGuard guard(q.device());
  auto result = delta_fused::backward(grad_out, grad_final_state, q, k, v, beta, log_gate, initial_state, cu_seqlens,
                                      causal, scale, normalize_qk, shared_memory_per_block(),
                                      CudaLaunch{c10::cuda::getCurrentCUDAStream().stream()});
  if (result.has_value()) return *result;
  return delta_fused::backward_elsewhere(grad_out, grad_final_state, q, k, v, beta, log_gate, initial_state,
                                         cu_seqlens, causal, scale, normalize_qk);
}

}  // namespace

TORCH_LIBRARY_IMPL(linattn, CUDA, m) {
  m.impl("delta_rule_fwd_fused", &forward_cuda);
  m.impl("delta_rule_bwd_fused", &backward_cuda);
}

}  // namespace linattn
