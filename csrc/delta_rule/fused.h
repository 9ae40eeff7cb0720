// delta_rule_fwd_fused's host side, shared by the CUDA kernel (fused_cuda_ops.cpp) and its CPU
// emulation (fused_emulated.cpp): check the inputs, decide whether the tensor-core forward
// (tensor_core/forward.h) takes the call, allocate the outputs and describe the launch;
// `launch(problem)` runs it on the device at hand. A call it does not take returns nothing, and
// the caller runs the operator's other path (delta_rule_fwd on the same device).
#pragma once

#include "op_checks.h"
#include "tensor_core/problem.h"
#include "../common/tensor_views.h"
#include "../common/warp/host_settings.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <tuple>

namespace linattn {
namespace delta_fused {

using Optional = std::optional<at::Tensor>;
using Forward = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                   const at::Tensor&, const Optional&, const Optional&,
                                                   const Optional&, bool, double, bool);

// Whether the tensor-core forward takes a call: 16-bit inputs, key dim up to 128 (the state's
// rows in registers) and a block's shared memory that fits.
inline bool takes(const at::Tensor& q, const at::Tensor& v, int64_t max_shared_bytes) {
  if (q.scalar_type() != at::kBFloat16 && q.scalar_type() != at::kHalf) return false;
  if (q.size(3) > 128 || !warp::tensor_cores_enabled()) return false;
  return delta_tensor_core::shared_bytes_of(q.size(3), v.size(3)) <= max_shared_bytes;
}

template <typename Launch>
std::optional<std::tuple<at::Tensor, at::Tensor>> forward(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, const at::Tensor& beta,
                                                          const Optional& log_gate, const Optional& initial_state,
                                                          const Optional& cu_seqlens, bool causal, double scale,
                                                          bool normalize_qk, int64_t max_shared_bytes,
                                                          const Launch& launch) {
  check_delta_rule_inputs(q, k, v, beta, log_gate, initial_state, cu_seqlens, scale);
  if (!takes(q, v, max_shared_bytes)) return std::nullopt;
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), dk = q.size(3), dv = v.size(3);
  // Packed sequences: the offsets checked on the host (a copy, and a sync, for CUDA tensors, as
  // the operator's other paths), then read by the blocks from the tensor itself.
  at::Tensor offsets;
  int64_t states = B;
  if (cu_seqlens.has_value()) {
    states = static_cast<int64_t>(read_packed_offsets(kDeltaRuleOp, *cu_seqlens, T).size()) - 1;
    offsets = cu_seqlens->contiguous();
  }
  const auto f32 = q.options().dtype(at::kFloat);
  auto out = at::empty({B, H, T, dv}, q.options());
  auto final_state = at::empty({states, H, dk, dv}, f32);
  // Per-token scalars and the state in fp32, contiguous (T values per head: small beside q).
  const at::Tensor b = beta.to(at::kFloat).contiguous();
  const at::Tensor g = log_gate.has_value() ? log_gate->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor initial = initial_state.has_value() ? initial_state->contiguous() : at::Tensor();
  AT_DISPATCH_REDUCED_FLOATING_TYPES(q.scalar_type(), "delta_rule_fwd_fused", [&] {
    delta_tensor_core::DeltaForwardProblem<scalar_t> p;
    p.batch = B;
    p.heads = H;
    p.length = T;
    p.key_dim = dk;
    p.value_dim = dv;
    p.causal = causal;
    p.normalize_qk = normalize_qk;
    p.scale = static_cast<float>(scale);
    p.q = view_of<scalar_t>(q);
    p.k = view_of<scalar_t>(k);
    p.v = view_of<scalar_t>(v);
    p.q_vector = warp::vector_rows<scalar_t>(q);
    p.k_vector = warp::vector_rows<scalar_t>(k);
    p.v_vector = warp::vector_rows<scalar_t>(v);
    p.beta = b.const_data_ptr<float>();
    p.log_gate = data_or_null<float>(g);
    p.state_in = data_or_null<float>(initial);
    p.state_out = final_state.mutable_data_ptr<float>();
    p.out = out.mutable_data_ptr<scalar_t>();
    const int64_t width = delta_tensor_core::value_tile_width(dv);
    p.value_tiles = std::max<int64_t>(1, (dv + width - 1) / width);
    p.offsets = data_or_null<int32_t>(offsets);
    p.sequences = states;
    if (p.blocks() > 0) launch(p);
  });
  return std::make_tuple(out, final_state);
}

// The operator's other path on the same device (the CPU kernel; the device-generic path on CUDA).
inline std::tuple<at::Tensor, at::Tensor> forward_elsewhere(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, const at::Tensor& beta,
                                                            const Optional& log_gate, const Optional& initial_state,
                                                            const Optional& cu_seqlens, bool causal, double scale,
                                                            bool normalize_qk) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("linattn::delta_rule_fwd", "").typed<Forward>();
  return op.call(q, k, v, beta, log_gate, initial_state, cu_seqlens, causal, scale, normalize_qk);
}

}  // namespace delta_fused
}  // namespace linattn
