// One decoding step of the delta rule (docs/methods.md §11): S' = e^g S, then
// S'' = S' + β k (v − S'ᵀ k)ᵀ and out = scale · S''ᵀ q. O(dk · dv) per head. A gate (B, H, dk)
// fades row r of S by e^{g_r} (Kimi Delta Attention), one (B, H) the whole state.
//   - delta_rule_step (CompositeImplicitAutograd, every device): ATen operations that autograd
//     differentiates; on CPU tensors with no gradient wanted it calls the fused step instead.
//   - delta_rule_step_fused: per (batch, head) two passes over the state (the prediction S'ᵀk,
//     then the update fused with the read-out), as a CPU kernel, with a Meta kernel for fake
//     tensors. What decoding runs on a CPU.
#include "op_checks.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace linattn {
namespace {

std::tuple<at::Tensor, at::Tensor> step_in_aten(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                const at::Tensor& beta, const std::optional<at::Tensor>& log_gate,
                                                const at::Tensor& state, double scale) {
  const auto acc = accumulate_type(q.scalar_type());
  at::Tensor S = state;
  if (log_gate.has_value()) {
    const at::Tensor factor = log_gate->to(acc).exp().unsqueeze(-1);  // (B, H, dk, 1) or (B, H, 1)
    S = S * (log_gate->dim() == 3 ? factor : factor.unsqueeze(-1));
  }
  const at::Tensor kk = k.to(acc), qq = q.to(acc);
  const at::Tensor predicted = at::matmul(kk.unsqueeze(-2), S).squeeze(-2);                     // S'ᵀ k
  const at::Tensor correction = beta.to(acc).unsqueeze(-1) * (v.to(acc) - predicted);           // β (v − S'ᵀ k)
  const at::Tensor S_new = S + kk.unsqueeze(-1) * correction.unsqueeze(-2);
  const at::Tensor out = at::matmul(qq.unsqueeze(-2), S_new).squeeze(-2) * scale;
  return {out.to(q.scalar_type()), S_new};
}

bool wants_gradient(std::initializer_list<const at::Tensor*> tensors) {
  if (!at::GradMode::is_enabled()) return false;
  for (const at::Tensor* t : tensors)
    if (t->defined() && t->requires_grad()) return true;
  return false;
}

std::tuple<at::Tensor, at::Tensor> delta_rule_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                   const at::Tensor& beta, const std::optional<at::Tensor>& log_gate,
                                                   const at::Tensor& state, double scale) {
  const at::Tensor none;
  const bool gradient = wants_gradient({&q, &k, &v, &beta, log_gate.has_value() ? &*log_gate : &none, &state});
  if (!gradient && (q.is_cpu() || q.is_meta())) {
    static const auto fused = c10::Dispatcher::singleton()
                                  .findSchemaOrThrow("linattn::delta_rule_step_fused", "")
                                  .typed<decltype(delta_rule_step)>();
    return fused.call(q, k, v, beta, log_gate, state, scale);  // which checks the inputs
  }
  check_delta_step_inputs(q, k, v, beta, log_gate, state);
  return step_in_aten(q, k, v, beta, log_gate, state, scale);
}

template <typename scalar_t>
void fused_step_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta,
                       const at::Tensor& gate, const at::Tensor& state, double scale, at::Tensor& out,
                       at::Tensor& new_state) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = q.size(0), H = q.size(1), dk = q.size(2), dv = v.size(2);
  const acc_t* S = state.const_data_ptr<acc_t>();
  acc_t* Sn = new_state.data_ptr<acc_t>();
  const acc_t* b_ptr = beta.const_data_ptr<acc_t>();
  const acc_t* g_ptr = gate.defined() ? gate.const_data_ptr<acc_t>() : nullptr;
  const int64_t gate_width = gate.defined() && gate.dim() == 3 ? dk : 1;
  const scalar_t *qp = q.const_data_ptr<scalar_t>(), *kp = k.const_data_ptr<scalar_t>(), *vp = v.const_data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> key(dk), factor(dk), correction(dv), read(dv);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      for (int64_t r = 0; r < dk; ++r)  // row r's factor: the head's, or its key channel's
        factor[r] = g_ptr != nullptr ? std::exp(g_ptr[bh * gate_width + (gate_width > 1 ? r : 0)]) : acc_t(1);
      const acc_t* S_bh = S + bh * dk * dv;
      acc_t* Sn_bh = Sn + bh * dk * dv;
      for (int64_t r = 0; r < dk; ++r) key[r] = acc_t(kp[b * k.stride(0) + h * k.stride(1) + r * k.stride(2)]);
      // The prediction S'ᵀk = Sᵀ (e^g ⊙ k), then the correction β (v − S'ᵀk).
      std::fill(correction.begin(), correction.end(), acc_t(0));
      for (int64_t r = 0; r < dk; ++r) {
        const acc_t kr = key[r] * factor[r];
        const acc_t* row = S_bh + r * dv;
        for (int64_t c = 0; c < dv; ++c) correction[c] += kr * row[c];
      }
      const acc_t bt = b_ptr[bh];
      for (int64_t c = 0; c < dv; ++c) {
        const acc_t vc = acc_t(vp[b * v.stride(0) + h * v.stride(1) + c * v.stride(2)]);
        correction[c] = bt * (vc - correction[c]);
      }
      // S'' = e^g S + k correctionᵀ, read by q in the same pass.
      std::fill(read.begin(), read.end(), acc_t(0));
      for (int64_t r = 0; r < dk; ++r) {
        const acc_t kr = key[r], qr = acc_t(qp[b * q.stride(0) + h * q.stride(1) + r * q.stride(2)]);
        const acc_t* row = S_bh + r * dv;
        acc_t* out_row = Sn_bh + r * dv;
        const acc_t fr = factor[r];
        for (int64_t c = 0; c < dv; ++c) {
          const acc_t updated = fr * row[c] + kr * correction[c];
          out_row[c] = updated;
          read[c] += qr * updated;
        }
      }
      for (int64_t c = 0; c < dv; ++c) op[bh * dv + c] = scalar_t(static_cast<acc_t>(scale) * read[c]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> delta_rule_step_fused_cpu(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const at::Tensor& beta,
                                                             const std::optional<at::Tensor>& log_gate,
                                                             const at::Tensor& state, double scale) {
  check_delta_step_inputs(q, k, v, beta, log_gate, state);
  const auto acc = accumulate_type(q.scalar_type());
  const at::Tensor S = state.contiguous();
  const at::Tensor b = beta.to(acc).contiguous();
  const at::Tensor g = log_gate.has_value() ? log_gate->to(acc).contiguous() : at::Tensor();
  auto out = at::empty({q.size(0), q.size(1), v.size(2)}, q.options());
  auto new_state = at::empty_like(S, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "delta_rule_step_fused", [&] {
    fused_step_kernel<scalar_t>(q, k, v, b, g, S, scale, out, new_state);
  });
  return {out, new_state};
}

std::tuple<at::Tensor, at::Tensor> delta_rule_step_fused_meta(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& v, const at::Tensor& beta,
                                                              const std::optional<at::Tensor>& log_gate,
                                                              const at::Tensor& state, double) {
  check_delta_step_inputs(q, k, v, beta, log_gate, state);
  return {at::empty_symint({q.sym_size(0), q.sym_size(1), v.sym_size(2)}, q.options()),
          at::empty_like(state, at::MemoryFormat::Contiguous)};
}

}  // namespace

TORCH_LIBRARY_IMPL(linattn, CompositeImplicitAutograd, m) { m.impl("delta_rule_step", &delta_rule_step); }
TORCH_LIBRARY_IMPL(linattn, CPU, m) { m.impl("delta_rule_step_fused", &delta_rule_step_fused_cpu); }
TORCH_LIBRARY_IMPL(linattn, Meta, m) { m.impl("delta_rule_step_fused", &delta_rule_step_fused_meta); }

}  // namespace linattn
