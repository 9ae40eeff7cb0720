// One decoding step of causal linear attention (docs/methods.md §1, recurrent form), fused for CPU:
// per (batch, head) the token's features join the faded state and the query reads it, in one
// pass over the m × dv state; every other device runs the same formula in ATen ops (step_generic).
// Its backward is ATen ops too (autograd.cpp).
// The Meta kernel applies the same checks, for fake tensors.
#include "generic.h"
#include "op_checks.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

namespace linattn {
namespace {

constexpr const char* kStepOp = "linattn.linear_attention_step";

struct StepSizes {
  c10::SymInt batch, heads, feature_dim, value_dim;
};

StepSizes check_step_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& S, const at::Tensor& z,
                            const std::optional<at::Tensor>& factor, int64_t feature_map, double eps) {
  const char* op = kStepOp;
  check_dim(op, "q", q, 3, "(B, H, D)");
  check_dim(op, "k", k, 3, "(B, H, D)");
  check_dim(op, "v", v, 3, "(B, H, dv)");
  check_floating(op, "q", q);
  check_same_device_dtype(op, "k", k, "q", q);
  check_same_device_dtype(op, "v", v, "q", q);
  TORCH_CHECK(q.sym_sizes() == k.sym_sizes() && q.sym_size(0) == v.sym_size(0) &&
                  q.sym_size(1) == v.sym_size(1),
              op, ": q and k must have the same shape (B, H, D) and v share (B, H), got q ",
              shape_str(q), ", k ", shape_str(k), " and v ", shape_str(v));
  check_feature_map_code(op, feature_map);
  check_eps(op, eps);
  StepSizes s{q.sym_size(0), q.sym_size(1), q.sym_size(2), v.sym_size(2)};
  const auto acc = accumulate_type(q.scalar_type());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"S", S}, {"z", z}}) {
    check_same_device(op, name, t, "q", q);
    TORCH_CHECK(t.scalar_type() == acc, op, ": ", name, " must be ", acc, " for ", q.scalar_type(),
                " inputs, got ", t.scalar_type());
  }
  check_shape(op, "S", S, {s.batch, s.heads, s.feature_dim, s.value_dim}, "(B, H, m, dv)");
  check_shape(op, "z", z, {s.batch, s.heads, s.feature_dim}, "(B, H, m)");
  if (factor.has_value()) {
    check_same_device(op, "factor", *factor, "q", q);
    TORCH_CHECK(factor->scalar_type() == acc, op, ": factor must be ", acc, " for ",
                q.scalar_type(), " inputs, got ", factor->scalar_type());
    if (factor->dim() == 3)  // per feature channel (GLA-style gates)
      check_shape(op, "factor", *factor, {s.batch, s.heads, s.feature_dim}, "(B, H, m)");
    else
      check_shape(op, "factor", *factor, {s.batch, s.heads}, "(B, H)");
  }
  return s;
}

template <typename acc_t>
acc_t feature(acc_t x, int64_t feature_map) {
  if (feature_map == kFeatureElu) return x > 0 ? x + acc_t(1) : std::exp(x);
  if (feature_map == kFeatureRelu) return x > 0 ? x : acc_t(0);
  return x;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> step_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& S_in,
    const at::Tensor& z_in, const std::optional<at::Tensor>& factor_in, int64_t feature_map,
    bool normalize, double eps) {
  check_step_inputs(q_in, k_in, v_in, S_in, z_in, factor_in, feature_map, eps);
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor S = S_in.contiguous(), z = z_in.contiguous();
  const at::Tensor factor = factor_in.has_value() ? factor_in->contiguous() : at::Tensor();
  const int64_t rows = q.size(0) * q.size(1), m = q.size(2), dv = v.size(2);
  auto out = at::empty_like(v);
  auto S_out = at::empty_like(S), z_out = at::empty_like(z);
  if (rows == 0) return {out, S_out, z_out};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "linear_attention_step", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *qp = q.const_data_ptr<scalar_t>(), *kp = k.const_data_ptr<scalar_t>(),
                   *vp = v.const_data_ptr<scalar_t>();
    const acc_t *Sp = S.const_data_ptr<acc_t>(), *zp = z.const_data_ptr<acc_t>();
    const acc_t* fp = factor.defined() ? factor.const_data_ptr<acc_t>() : nullptr;
    const bool per_channel = factor.defined() && factor.dim() == 3;
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    acc_t *So = S_out.mutable_data_ptr<acc_t>(), *zo = z_out.mutable_data_ptr<acc_t>();
    // Tiny per row (m·dv); only split rows over threads when there is enough work for it.
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, m * dv));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> phi_q(m), phi_k(m), values(dv), num(dv);
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t i = 0; i < m; ++i) {
          phi_q[i] = feature(static_cast<acc_t>(qp[r * m + i]), feature_map);
          phi_k[i] = feature(static_cast<acc_t>(kp[r * m + i]), feature_map);
        }
        for (int64_t j = 0; j < dv; ++j) values[j] = static_cast<acc_t>(vp[r * dv + j]), num[j] = 0;
        acc_t den = 0;
        for (int64_t i = 0; i < m; ++i) {
          const acc_t f = !fp ? acc_t(1) : per_channel ? fp[r * m + i] : fp[r];
          const acc_t* s_row = Sp + (r * m + i) * dv;
          acc_t* o_row = So + (r * m + i) * dv;
          const acc_t pk = phi_k[i], pq = phi_q[i];
          for (int64_t j = 0; j < dv; ++j) {
            o_row[j] = f * s_row[j] + pk * values[j];
            num[j] += pq * o_row[j];
          }
          zo[r * m + i] = f * zp[r * m + i] + pk;
          den += pq * zo[r * m + i];
        }
        den += static_cast<acc_t>(eps);
        // A vanished (0 or subnormal) normalizer defines the row as 0, as the other kernels do.
        const bool vanished = std::abs(den) < std::numeric_limits<acc_t>::min();
        for (int64_t j = 0; j < dv; ++j) {
          const acc_t value = !normalize ? num[j] : (vanished ? acc_t(0) : num[j] / den);
          op[r * dv + j] = static_cast<scalar_t>(value);
        }
      }
    });
  });
  return {out, S_out, z_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> step_meta(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& S,
    const at::Tensor& z, const std::optional<at::Tensor>& factor, int64_t feature_map,
    bool normalize, double eps) {
  check_step_inputs(q, k, v, S, z, factor, feature_map, eps);
  return {at::empty_like(v, at::MemoryFormat::Contiguous), at::empty_like(S, at::MemoryFormat::Contiguous),
          at::empty_like(z, at::MemoryFormat::Contiguous)};
}

// The step on every device but the CPU, in ATen ops (the same formula; autograd.cpp's backward
// serves both).
std::tuple<at::Tensor, at::Tensor, at::Tensor> step_generic(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& S,
    const at::Tensor& z, const std::optional<at::Tensor>& factor, int64_t feature_map, bool normalize,
    double eps) {
  check_step_inputs(q, k, v, S, z, factor, feature_map, eps);
  const auto acc = S.scalar_type();
  const auto map = static_cast<FeatureMap>(feature_map);
  const at::Tensor phi_q = features(q.to(acc), map), phi_k = features(k.to(acc), map);
  at::Tensor S_out = S, z_out = z;
  if (factor.has_value()) {  // (B, H), or (B, H, m): one per feature channel, a row of S
    const at::Tensor row_factor = factor->dim() == 3 ? *factor : factor->unsqueeze(-1);
    S_out = S_out * row_factor.unsqueeze(-1);
    z_out = z_out * row_factor;
  }
  S_out = (S_out + phi_k.unsqueeze(-1) * v.to(acc).unsqueeze(-2)).contiguous();
  z_out = (z_out + phi_k).contiguous();
  at::Tensor out = at::matmul(phi_q.unsqueeze(-2), S_out).squeeze(-2);
  if (normalize) {
    // A vanished (0 or subnormal) normalizer defines the row as 0, as the other kernels do.
    const at::Tensor den = (phi_q * z_out).sum(-1, true) + eps;
    const double tiny = acc == at::kDouble ? std::numeric_limits<double>::min() : std::numeric_limits<float>::min();
    const at::Tensor vanished = den.abs() < tiny;
    out = at::where(vanished, out * 0, out / at::where(vanished, at::ones_like(den), den));
  }
  return {out.to(q.scalar_type()).contiguous(), S_out, z_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(linattn, CPU, m) { m.impl("linear_attn_step", &step_cpu); }
TORCH_LIBRARY_IMPL(linattn, CompositeExplicitAutograd, m) {
  m.impl("linear_attn_step", &step_generic);
  m.impl("linear_attn_step_generic", &step_generic);
}
TORCH_LIBRARY_IMPL(linattn, Meta, m) {
  m.impl("linear_attn_step", &step_meta);
  m.impl("linear_attn_step_generic", &step_meta);
}

}  // namespace linattn
