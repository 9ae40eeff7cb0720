// restricted_softmax_fwd_fused for CUDA tensors: the flash engine (flash/forward_cuda_kernels.cu)
// on the tensors' device and current stream; calls it does not take run restricted_softmax_fwd.
// Compiled only in CUDA builds (setup.py: *cuda* sources).
#include "flash/launch.h"
#include "flash/plan.h"
#include "../common/cuda_device.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

namespace linattn {
namespace {

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                double scale, LINATTN_RESTRICTED_PATTERN_PARAMS) {
  const RestrictedPattern pattern{LINATTN_RESTRICTED_PATTERN_ARGS};
  check_restricted_inputs(q, k, v, scale, pattern);
  const c10::cuda::CUDAGuard guard(q.device());
  const int buffers = flash::buffers_taking(q, v, false, shared_memory_per_block());
  if (buffers == 0)
    return flash::unfused_forward(q, k, v, scale, LINATTN_RESTRICTED_PATTERN_ARGS);
  return flash::run_call(q, k, v, scale, pattern, [&](const auto& problem) {
    TORCH_CHECK(problem.blocks() <= std::numeric_limits<int32_t>::max(), kRestrictedSoftmaxOp,
                ": batch · heads · query tiles = ", problem.blocks(), " exceeds a CUDA grid");
    flash::launch_forward(problem, buffers, c10::cuda::getCurrentCUDAStream().stream());
  });
}

RestrictedGradients backward_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, double scale,
    LINATTN_RESTRICTED_PATTERN_PARAMS) {
  const RestrictedPattern pattern{LINATTN_RESTRICTED_PATTERN_ARGS};
  check_restricted_backward_inputs(grad_out, grad_lse, q, k, v, out, lse, scale, pattern);
  const c10::cuda::CUDAGuard guard(q.device());
  const int buffers = flash::buffers_taking(q, v, true, shared_memory_per_block());
  if (buffers == 0)
    return flash::unfused_backward(grad_out, grad_lse, q, k, v, out, lse, scale, LINATTN_RESTRICTED_PATTERN_ARGS);
  auto launch = [&](const auto& problem, const auto& gradients) {
    const int64_t blocks = std::max(problem.blocks(), problem.key_blocks());
    TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), kRestrictedSoftmaxOp,
                ": batch · heads · tiles exceeds a CUDA grid");
    flash::launch_backward(problem, gradients, buffers, c10::cuda::getCurrentCUDAStream().stream());
  };
  return flash::run_backward_call(grad_out, grad_lse, q, k, v, out, lse, scale, pattern, launch);
}

}  // namespace

TORCH_LIBRARY_IMPL(linattn, CUDA, m) {
  m.impl("restricted_softmax_fwd_fused", &forward_cuda);
  m.impl("restricted_softmax_bwd_fused", &backward_cuda);
}

}  // namespace linattn
