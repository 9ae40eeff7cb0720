// delta_rule_step_fused for CUDA tensors: the column program (step_kernel.h) as one kernel launch
// on the tensors' device and current stream; float64 runs delta_rule_step's ATen formula.
// Compiled only in CUDA builds (setup.py: *cuda* sources).
#include "step_fused.h"
#include "step_launch.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

namespace linattn {
namespace {

using Step = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                                                double);

struct CudaLaunch {
  cudaStream_t stream;
  template <typename scalar_t>
  void operator()(const delta_step::StepProblem<scalar_t>& p) const {
    TORCH_CHECK(p.batch * p.heads <= std::numeric_limits<int32_t>::max() && p.value_dim <= 65535 * 128, kDeltaStepOp,
                ": batch · heads = ", p.batch * p.heads, " or dv = ", p.value_dim, " exceeds the fused step's grid");
    delta_step::launch_step(p, stream);
  }
};

std::tuple<at::Tensor, at::Tensor> step_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             const at::Tensor& beta, const std::optional<at::Tensor>& log_gate,
                                             const at::Tensor& state, double scale) {
  if (q.scalar_type() == at::kDouble) {
    static const auto formula =
        c10::Dispatcher::singleton().findSchemaOrThrow("linattn::delta_rule_step", "").typed<Step>();
    return formula.call(q, k, v, beta, log_gate, state, scale);
  }
  const c10::cuda::CUDAGuard guard(q.device());
  return delta_step::fused_step(q, k, v, beta, log_gate, state, scale,
                                CudaLaunch{c10::cuda::getCurrentCUDAStream().stream()});
}

}  // namespace

TORCH_LIBRARY_IMPL(linattn, CUDA, m) { m.impl("delta_rule_step_fused", &step_cuda); }

}  // namespace linattn
