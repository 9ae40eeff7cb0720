// delta_rule_bwd_fused's host side, shared by the CUDA kernels (fused_cuda_ops.cpp) and their CPU
// emulation (fused_emulated.cpp): the gradient of the tensor-core forward, in three steps.
//   1. The forward kernel walks the state again, keeping the state entering every chunk and u.
//   2. The backward walk kernel (tensor_core/backward_walk.h) walks the state's gradient through
//      the chunks in reverse, keeping dS leaving every chunk and du.
//   3. Every gradient from those, for all chunks at once: the device-generic backward's batched
//      products (generic.h, assemble_gradients) — the sequential part is the kernels'.
// Memory: two states per chunk (fp32), as the device-generic backward. Packed sequences run one
// such call per sequence (as the device-generic backward does). A call it does not take (what the
// forward does not take) returns nothing, and the caller runs delta_rule_bwd on the same device.
#pragma once

#include "fused.h"
#include "generic.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <tuple>
#include <vector>

namespace linattn {
namespace delta_fused {

using Gradients = delta_generic::Gradients;
using Backward = Gradients(const at::Tensor&, const Optional&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, const Optional&, const Optional&,
                           const Optional&, bool, double, bool);

// One batch of sequences (no packing, T > 0, inputs checked). `launch` runs the two walks:
// launch.forward_keeping(problem), launch.backward_walk(problem).
template <typename Launch>
Gradients backward_unpacked(const at::Tensor& grad_out, const Optional& grad_final_state, const at::Tensor& q,
                            const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta, const Optional& log_gate,
                            const Optional& initial_state, bool causal, double scale, bool normalize_qk,
                            const Launch& launch) {
  using namespace delta_generic;
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), dk = q.size(3), dv = v.size(3);
  const int64_t chunks = (T + delta_tensor_core::kChunk - 1) / delta_tensor_core::kChunk;
  const auto f32 = q.options().dtype(at::kFloat);
  const at::Tensor b = beta.to(at::kFloat).contiguous();
  const at::Tensor g = log_gate.has_value() ? log_gate->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor initial = initial_state.has_value() ? initial_state->contiguous() : at::Tensor();
  const at::Tensor none;

  // 1. The state entering every chunk, u and the final state.
  const Kept forward_walk{at::empty({B, H, chunks, dk, dv}, f32), at::empty({B, H, T, dv}, f32)};
  at::Tensor final_state = at::empty({B, H, dk, dv}, f32);
  launch_call(q, k, v, b, g, initial, final_state, nullptr, causal, scale, normalize_qk, none, 0,
              [&](const auto& problem) { launch.forward_keeping(problem); }, forward_walk,
              delta_tensor_core::kWalkValueTile);

  // q and k as the batched products take them (normalised in fp32), dO with the scale.
  at::Tensor qh = q.to(at::kFloat), kh = k.to(at::kFloat), rq, rk;
  if (normalize_qk) {
    std::tie(qh, rq) = normalized(q);
    std::tie(kh, rk) = normalized(k);
  }
  const at::Tensor dO = grad_out.to(at::kFloat) * scale;
  at::Tensor dS = grad_final_state.has_value() ? grad_final_state->contiguous() : at::zeros({B, H, dk, dv}, f32);
  at::Tensor grad_q;
  if (!causal) {  // out = scale · Q S_T
    grad_q = at::matmul(dO, final_state.transpose(-1, -2));
    dS = (dS + at::matmul(qh.transpose(-1, -2), dO)).contiguous();
  }

  // 2. dS leaving every chunk, du and dS entering the first.
  const Kept backward_walk{at::empty({B, H, chunks, dk, dv}, f32), at::empty({B, H, T, dv}, f32)};
  at::Tensor grad_initial = at::empty({B, H, dk, dv}, f32);
  launch_call(q, k, grad_out, b, g, dS, grad_initial, nullptr, causal, scale, normalize_qk, none, 0,
              [&](const auto& problem) { launch.backward_walk(problem); }, backward_walk,
              delta_tensor_core::kWalkValueTile);

  // 3. The rest, parallel over the chunks.
  const Chunks c = prepare(qh, kh, v, beta, log_gate, causal);
  const auto chunked = [&](const at::Tensor& x) { return to_chunks(x, c.chunk, c.count, c.count * c.chunk - T); };
  const Walks walks{forward_walk.chunk_states, chunked(forward_walk.chunk_values), backward_walk.chunk_states,
                    chunked(backward_walk.chunk_values)};
  auto [dq, dk_, dv_, dbeta, dgate, dinitial] =
      assemble_gradients(c, walks, causal ? chunked(dO) : dO, grad_q, causal, log_gate, at::kFloat,
                         beta.scalar_type(), grad_initial);
  if (normalize_qk) {
    dq = unnormalized_gradient(dq, qh, rq);
    dk_ = unnormalized_gradient(dk_, kh, rk);
  }
  return Gradients{dq.to(q.scalar_type()).contiguous(), dk_.to(q.scalar_type()).contiguous(),
                   dv_.to(q.scalar_type()).contiguous(), dbeta, dgate, dinitial};
}

template <typename Launch>
std::optional<Gradients> backward(const at::Tensor& grad_out, const Optional& grad_final_state, const at::Tensor& q,
                                  const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta,
                                  const Optional& log_gate, const Optional& initial_state,
                                  const Optional& cu_seqlens, bool causal, double scale, bool normalize_qk,
                                  int64_t max_shared_bytes, const Launch& launch) {
  const DeltaRuleSizes sizes = check_delta_rule_inputs(q, k, v, beta, log_gate, initial_state, cu_seqlens, scale);
  check_delta_rule_grads(grad_out, grad_final_state, q, v, sizes);
  if (!takes(q, v, max_shared_bytes) || delta_tensor_core::walk_shared_bytes_of(q.size(3)) > max_shared_bytes) {
    return std::nullopt;
  }
  const auto one = [&](const at::Tensor& d_out, const Optional& d_final, const at::Tensor& qs, const at::Tensor& ks,
                       const at::Tensor& vs, const at::Tensor& bs, const Optional& gs, const Optional& s0) {
    if (qs.size(2) == 0) {  // nothing to walk: the state's gradient passes through
      const auto f32 = q.options().dtype(at::kFloat);
      const at::Tensor dS = d_final.has_value() ? d_final->clone() : at::zeros({qs.size(0), qs.size(1), qs.size(3),
                                                                                 vs.size(3)}, f32);
      return Gradients{at::zeros_like(qs), at::zeros_like(ks), at::zeros_like(vs), at::zeros_like(bs),
                       gs.has_value() ? at::zeros_like(*gs) : at::empty({0}, f32), dS};
    }
    return backward_unpacked(d_out, d_final, qs, ks, vs, bs, gs, s0, causal, scale, normalize_qk, launch);
  };
  if (!cu_seqlens.has_value()) return one(grad_out, grad_final_state, q, k, v, beta, log_gate, initial_state);
  // Packed sequences: one call per sequence, its rows and its own states.
  const std::vector<int64_t> offsets = read_packed_offsets(kDeltaRuleOp, *cu_seqlens, q.size(2));
  if (offsets.size() == 1) return std::nullopt;  // no sequence at all: delta_rule_bwd's shapes
  const auto rows = [](const Optional& t, int64_t a, int64_t b) {
    return t.has_value() ? Optional(t->slice(2, a, b)) : std::nullopt;
  };
  const auto state = [](const Optional& t, int64_t n) {
    return t.has_value() ? Optional(t->slice(0, n, n + 1)) : std::nullopt;
  };
  std::vector<at::Tensor> parts[6];
  for (size_t n = 0; n + 1 < offsets.size(); ++n) {
    const int64_t a = offsets[n], b = offsets[n + 1];
    const Gradients g = one(grad_out.slice(2, a, b), state(grad_final_state, n), q.slice(2, a, b), k.slice(2, a, b),
                            v.slice(2, a, b), beta.slice(2, a, b), rows(log_gate, a, b), state(initial_state, n));
    parts[0].push_back(std::get<0>(g)), parts[1].push_back(std::get<1>(g)), parts[2].push_back(std::get<2>(g));
    parts[3].push_back(std::get<3>(g)), parts[4].push_back(std::get<4>(g)), parts[5].push_back(std::get<5>(g));
  }
  return Gradients{at::cat(parts[0], 2), at::cat(parts[1], 2), at::cat(parts[2], 2), at::cat(parts[3], 2),
                   log_gate.has_value() ? at::cat(parts[4], 2) : parts[4].front(), at::cat(parts[5], 0)};
}

// delta_rule_bwd on the same device (the CPU kernel; the device-generic path on CUDA).
inline Gradients backward_elsewhere(const at::Tensor& grad_out, const Optional& grad_final_state, const at::Tensor& q,
                                    const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta,
                                    const Optional& log_gate, const Optional& initial_state,
                                    const Optional& cu_seqlens, bool causal, double scale, bool normalize_qk) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("linattn::delta_rule_bwd", "").typed<Backward>();
  return op.call(grad_out, grad_final_state, q, k, v, beta, log_gate, initial_state, cu_seqlens, causal, scale,
                 normalize_qk);
}

}  // namespace delta_fused
}  // namespace linattn
