// linattn::_delta_rule_step_emulated: the fused decoding step's CUDA column program
// (step_kernel.h) run on CPU tensors, every (batch, head, column) in turn, so the tests check on
// any machine the code each GPU thread runs. delta_rule_step_fused's CPU kernel (step.cpp) is
// the one decoding uses on a CPU.
#include "step_fused.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

namespace linattn {
namespace {

struct EmulatedLaunch {
  template <typename scalar_t>
  void operator()(const delta_step::StepProblem<scalar_t>& p) const {
    at::parallel_for(0, p.batch * p.heads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh)
        for (int64_t c = 0; c < p.value_dim; ++c) delta_step::step_column(p, bh, c);
    });
  }
};

std::tuple<at::Tensor, at::Tensor> step_emulated(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const at::Tensor& beta, const std::optional<at::Tensor>& log_gate,
                                                 const at::Tensor& state, double scale) {
  return delta_step::fused_step(q, k, v, beta, log_gate, state, scale, EmulatedLaunch{});
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(linattn, m) {
  m.def(
      "_delta_rule_step_emulated(Tensor q, Tensor k, Tensor v, Tensor beta, Tensor? log_gate, Tensor state, "
      "float scale=1.0) -> (Tensor out, Tensor new_state)");
}
TORCH_LIBRARY_IMPL(linattn, CPU, m) { m.impl("_delta_rule_step_emulated", &step_emulated); }

}  // namespace linattn
