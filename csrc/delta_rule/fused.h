// delta_rule_fwd_fused's host side, shared by the CUDA kernel (fused_cuda_ops.cpp) and its CPU
// emulation (fused_emulated.cpp): check the inputs, decide whether the tensor-core forward
// (tensor_core/forward.h) takes the call, allocate the outputs and describe the launch;
// `launch(problem)` runs it on the device at hand (`launch.processors()`: its SMs, for the
// sequence split). A call it does not take returns nothing, and the caller runs the operator's
// other path (delta_rule_fwd on the same device).
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
#include <vector>

namespace linattn {
namespace delta_fused {

using Optional = std::optional<at::Tensor>;
using Forward = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                   const at::Tensor&, const Optional&, const Optional&,
                                                   const Optional&, bool, double, bool);

// Whether the tensor-core forward takes a call: 16-bit inputs, key dim up to 128 (the state's
// rows in registers) and a block's shared memory that fits (gates per key channel add their G).
inline bool takes(const at::Tensor& q, const at::Tensor& v, const Optional& log_gate, int64_t max_shared_bytes) {
  if (q.scalar_type() != at::kBFloat16 && q.scalar_type() != at::kHalf) return false;
  if (q.size(3) > 128 || !warp::tensor_cores_enabled()) return false;
  return delta_tensor_core::shared_bytes_of(q.size(3), v.size(3), per_channel_gates(log_gate)) <= max_shared_bytes;
}

// What a walk keeps for the backward (DeltaForwardProblem::chunk_states and chunk_values,
// contiguous fp32; packed: chunk_offsets, int32), or nothing.
struct Kept {
  at::Tensor chunk_states, chunk_values, chunk_offsets;
};

// One launch over q, k, v (B, H, T, ·) with β and the gate in fp32 (contiguous), from `initial`
// (contiguous fp32, or undefined: zeros) into `final_state`; `out` null: the final state only.
// `launch(problem)` runs it; value tiles of `tile_width` columns (0: the forward's width).
template <typename Launch>
void launch_call(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta,
                 const at::Tensor& gate, const at::Tensor& initial, at::Tensor& final_state, at::Tensor* out,
                 bool causal, double scale, bool normalize_qk, const at::Tensor& offsets, int64_t sequences,
                 const Launch& launch, const Kept& kept = {}, int64_t tile_width = 0) {
  AT_DISPATCH_REDUCED_FLOATING_TYPES(q.scalar_type(), "delta_rule_fwd_fused", [&] {
    delta_tensor_core::DeltaForwardProblem<scalar_t> p;
    p.batch = q.size(0);
    p.heads = q.size(1);
    p.length = q.size(2);
    p.key_dim = q.size(3);
    p.value_dim = v.size(3);
    p.causal = causal;
    p.normalize_qk = normalize_qk;
    p.scale = static_cast<float>(scale);
    p.q = view_of<scalar_t>(q);
    p.k = view_of<scalar_t>(k);
    p.v = view_of<scalar_t>(v);
    p.q_vector = warp::vector_rows<scalar_t>(q);
    p.k_vector = warp::vector_rows<scalar_t>(k);
    p.v_vector = warp::vector_rows<scalar_t>(v);
    p.beta = beta.const_data_ptr<float>();
    p.log_gate = data_or_null<float>(gate);
    p.gate_per_channel = gate.defined() && gate.dim() == 4;
    p.state_in = data_or_null<float>(initial);
    p.state_out = final_state.mutable_data_ptr<float>();
    p.out = out != nullptr ? out->mutable_data_ptr<scalar_t>() : nullptr;
    const int64_t width =
        tile_width > 0 ? tile_width : delta_tensor_core::value_tile_width(p.value_dim, p.gate_per_channel);
    p.value_tiles = std::max<int64_t>(1, (p.value_dim + width - 1) / width);
    p.offsets = data_or_null<int32_t>(offsets);
    p.sequences = sequences;
    p.chunk_states = kept.chunk_states.defined() ? kept.chunk_states.mutable_data_ptr<float>() : nullptr;
    p.chunk_values = kept.chunk_values.defined() ? kept.chunk_values.mutable_data_ptr<float>() : nullptr;
    p.chunk_offsets = data_or_null<int32_t>(kept.chunk_offsets);
    if (p.blocks() > 0) launch(p);
  });
}

// The sequence split: a causal call whose (batch, head, value tile) blocks are fewer than the
// GPU's SMs is cut into segments of at least kMinimumSegment rows, a block each.
constexpr int64_t kMinimumSegment = 8 * delta_tensor_core::kChunk;

inline int64_t segments_for(int64_t blocks, int64_t length, int64_t processors) {
  if (blocks == 0 || blocks >= processors) return 1;
  const int64_t wanted = (processors + blocks - 1) / blocks, longest = length / kMinimumSegment;
  return std::max<int64_t>(1, std::min(wanted, longest));
}

// A segment acts on the state it receives as an affine map, S_end = M S_start + N (as the
// context-parallel delta rule, linattn/distributed.py): pass 1 runs every segment at once on the
// values [v | 0] from the state [0 | I], which ends in [N | M]; the maps are composed in segment
// order (a few small batched products); pass 2 runs every segment from its true state, writing
// the outputs. Segments are extra "heads" of zero-padded copies of the inputs (padding rows have
// β = 0 and g = 0: they change nothing).
template <typename Launch>
std::tuple<at::Tensor, at::Tensor> split_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const at::Tensor& beta, const at::Tensor& gate,
                                                 const at::Tensor& initial, double scale, bool normalize_qk,
                                                 int64_t segments, const Launch& launch) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), dk = q.size(3), dv = v.size(3);
  const int64_t chunk = delta_tensor_core::kChunk;
  const int64_t rows = ((T + segments - 1) / segments + chunk - 1) / chunk * chunk, padded = rows * segments;
  const auto cut = [&](const at::Tensor& x) {  // (B, H, T, ...) → (B, H · segments, rows, ...)
    std::vector<int64_t> pad(2 * (x.dim() - 2), 0), shape{B, H * segments, rows};
    pad[pad.size() - 1] = padded - T;
    if (x.dim() == 4) shape.push_back(x.size(3));
    return at::constant_pad_nd(x, pad).reshape(shape);
  };
  const at::Tensor qs = cut(q), ks = cut(k), vs = cut(v), bs = cut(beta);
  const at::Tensor gs = gate.defined() ? cut(gate) : at::Tensor();
  const auto f32 = q.options().dtype(at::kFloat);
  const at::Tensor none;
  // Pass 1: every segment's [N | M].
  const at::Tensor values = at::cat({vs, at::zeros({B, H * segments, rows, dk}, v.options())}, -1);
  const at::Tensor start =
      at::cat({at::zeros({B, H * segments, dk, dv}, f32), at::eye(dk, f32).expand({B, H * segments, dk, dk})}, -1)
          .contiguous();
  at::Tensor maps = at::empty({B, H * segments, dk, dv + dk}, f32);
  launch_call(qs, ks, values, bs, gs, start, maps, nullptr, true, scale, normalize_qk, none, 0, launch);
  // The state entering each segment.
  const at::Tensor per_segment = maps.view({B, H, segments, dk, dv + dk});
  at::Tensor state = initial.defined() ? initial : at::zeros({B, H, dk, dv}, f32);
  at::Tensor starts = at::empty({B, H, segments, dk, dv}, f32);
  for (int64_t s = 0; s < segments; ++s) {
    starts.select(2, s).copy_(state);
    const at::Tensor map = per_segment.select(2, s);
    state = at::matmul(map.narrow(-1, dv, dk), state) + map.narrow(-1, 0, dv);
  }
  // Pass 2: the outputs.
  at::Tensor outs = at::empty({B, H * segments, rows, dv}, q.options());
  at::Tensor finals = at::empty({B, H * segments, dk, dv}, f32);
  launch_call(qs, ks, vs, bs, gs, starts.view({B, H * segments, dk, dv}), finals, &outs, true, scale, normalize_qk,
              none, 0, launch);
  at::Tensor out = outs.view({B, H, padded, dv}).narrow(2, 0, T).contiguous();
  return {out, state};
}

template <typename Launch>
std::optional<std::tuple<at::Tensor, at::Tensor>> forward(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, const at::Tensor& beta,
                                                          const Optional& log_gate, const Optional& initial_state,
                                                          const Optional& cu_seqlens, bool causal, double scale,
                                                          bool normalize_qk, int64_t max_shared_bytes,
                                                          const Launch& launch) {
  check_delta_rule_inputs(q, k, v, beta, log_gate, initial_state, cu_seqlens, scale);
  if (!takes(q, v, log_gate, max_shared_bytes)) return std::nullopt;
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), dk = q.size(3), dv = v.size(3);
  // Per-token scalars and the state in fp32, contiguous (T values per head: small beside q).
  const at::Tensor b = beta.to(at::kFloat).contiguous();
  const at::Tensor g = log_gate.has_value() ? log_gate->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor initial = initial_state.has_value() ? initial_state->contiguous() : at::Tensor();
  const bool per_channel = per_channel_gates(log_gate);
  const int64_t width = delta_tensor_core::value_tile_width(dv, per_channel);
  const int64_t segments =
      causal && !cu_seqlens.has_value() ? segments_for(B * H * ((dv + width - 1) / width), T, launch.processors()) : 1;
  if (segments > 1 && delta_tensor_core::shared_bytes_of(dk, dk + dv, per_channel) <= max_shared_bytes) {
    return split_forward(q, k, v, b, g, initial, scale, normalize_qk, segments, launch);
  }
  // Packed sequences: the offsets checked on the host (a copy, and a sync, for CUDA tensors, as
  // the operator's other paths), then read by the blocks from the tensor itself.
  at::Tensor offsets;
  int64_t states = B;
  if (cu_seqlens.has_value()) {
    states = static_cast<int64_t>(read_packed_offsets(kDeltaRuleOp, *cu_seqlens, T).size()) - 1;
    offsets = cu_seqlens->contiguous();
  }
  auto out = at::empty({B, H, T, dv}, q.options());
  auto final_state = at::empty({states, H, dk, dv}, q.options().dtype(at::kFloat));
  launch_call(q, k, v, b, g, initial, final_state, &out, causal, scale, normalize_qk, offsets, states, launch);
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
