// restricted_softmax_fwd_fused for CUDA tensors: the flash engine (flash/forward_cuda_kernels.cu)
// on the tensors' device and current stream; calls it does not take run restricted_softmax_fwd.
// Compiled only in CUDA builds (setup.py: *cuda* sources).
#include "flash/launch.h"
#include "flash/plan.h"
#include "../common/cuda_device.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

namespace linattn {
namespace {

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                double scale, LINATTN_RESTRICTED_PATTERN_PARAMS) {
  const RestrictedPattern pattern{LINATTN_RESTRICTED_PATTERN_ARGS};
  check_restricted_inputs(q, k, v, scale, pattern);
  const c10::cuda::CUDAGuard guard(q.device());
  if (!flash::takes(q, v, shared_memory_per_block()))
    return flash::unfused_forward(q, k, v, scale, LINATTN_RESTRICTED_PATTERN_ARGS);
  return flash::run_call(q, k, v, scale, pattern, [](const auto& problem) {
    TORCH_CHECK(problem.blocks() <= std::numeric_limits<int32_t>::max(), kRestrictedSoftmaxOp,
                ": batch · heads · query tiles = ", problem.blocks(), " exceeds a CUDA grid");
    flash::launch_forward(problem, c10::cuda::getCurrentCUDAStream().stream());
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(linattn, CUDA, m) { m.impl("restricted_softmax_fwd_fused", &forward_cuda); }

}  // namespace linattn
