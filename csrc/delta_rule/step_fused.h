// The fused decoding step's host side, shared by the CUDA kernel (step_cuda_ops.cpp) and its CPU
// emulation (step_emulated.cpp): check, allocate, describe the step as a StepProblem
// (step_kernel.h); `launch(problem)` runs it on the device at hand. 16- and 32-bit inputs (the
// state in fp32); float64 has no kernel here.
#pragma once

#include "op_checks.h"
#include "step_kernel.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <tuple>

namespace linattn {
namespace delta_step {

template <typename Launch>
std::tuple<at::Tensor, at::Tensor> fused_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              const at::Tensor& beta, const std::optional<at::Tensor>& log_gate,
                                              const at::Tensor& state, double scale, const Launch& launch) {
  check_delta_step_inputs(q, k, v, beta, log_gate, state);
  TORCH_CHECK(q.scalar_type() != at::kDouble, kDeltaStepOp,
              ": the fused step kernel takes float32, bfloat16 or float16 inputs, got ", q.scalar_type());
  const at::Tensor S = state.contiguous();
  const at::Tensor b = beta.to(at::kFloat).contiguous();
  const at::Tensor g = log_gate.has_value() ? log_gate->to(at::kFloat).contiguous() : at::Tensor();
  auto out = at::empty({q.size(0), q.size(1), v.size(2)}, q.options());
  auto new_state = at::empty_like(S, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "delta_rule_step_fused", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      StepProblem<scalar_t> p;
      p.batch = q.size(0);
      p.heads = q.size(1);
      p.key_dim = q.size(2);
      p.value_dim = v.size(2);
      p.q = q.const_data_ptr<scalar_t>();
      p.k = k.const_data_ptr<scalar_t>();
      p.v = v.const_data_ptr<scalar_t>();
      for (int d = 0; d < 3; ++d) {
        p.q_stride[d] = q.stride(d);
        p.k_stride[d] = k.stride(d);
        p.v_stride[d] = v.stride(d);
      }
      p.beta = b.const_data_ptr<float>();
      p.log_gate = g.defined() ? g.const_data_ptr<float>() : nullptr;
      p.gate_width = g.defined() && g.dim() == 3 ? p.key_dim : 1;
      p.state = S.const_data_ptr<float>();
      p.new_state = new_state.mutable_data_ptr<float>();
      p.out = out.mutable_data_ptr<scalar_t>();
      p.scale = static_cast<float>(scale);
      if (p.batch * p.heads * p.value_dim > 0) launch(p);
    }
  });
  return {out, new_state};
}

}  // namespace delta_step
}  // namespace linattn
