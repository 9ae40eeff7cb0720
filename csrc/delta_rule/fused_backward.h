// delta_rule_bwd_fused's host side, shared by the CUDA kernels (fused_cuda_ops.cpp) and their CPU
// emulation (fused_emulated.cpp): the gradient of the tensor-core forward, in three steps.
//   1. The forward kernel walks the state again, keeping the state entering every chunk and u.
//   2. The backward walk kernel (tensor_core/backward_walk.h) walks the state's gradient through
//      the chunks in reverse, keeping dS leaving every chunk and du.
//   3. Every gradient from those, for all chunks at once: the device-generic backward's batched
//      products (generic.h, assemble_gradients) — the sequential part is the kernels'.
// Memory: two states per chunk (fp32), as the device-generic backward. Packed sequences run in
// the same launches: the kernels take the offsets, and the batched products see every sequence's
// rows padded to whole chunks, all sequences' chunks end to end (ChunkLayout). A call it does not
// take (what the forward does not take) returns nothing, and the caller runs delta_rule_bwd on the
// same device.
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

// How the batched products see the rows. Unpacked: as they lie, (B, H, T) in chunks of 64 (or T).
// Packed (B = 1): every sequence's rows padded to whole chunks of 64 and the sequences' chunks laid
// end to end, (1, H, n · 64), so that no chunk mixes two sequences: slot_rows gives the row each
// slot reads (`total`: a zero row), token_slots the slot of each row, chunk_sequences the sequence
// of each chunk, chunk_offsets (N + 1) each sequence's first chunk, as the kernels index it.
struct ChunkLayout {
  at::Tensor offsets, chunk_offsets, slot_rows, token_slots, chunk_sequences;
  std::vector<int64_t> chunk_starts;  // chunk_offsets on the host
  int64_t sequences = 0, chunks = 0;

  bool packed() const { return offsets.defined(); }
  // (1, H, total, ...) → (1, H, n · 64, ...)
  at::Tensor gather(const at::Tensor& x) const {
    if (!packed()) return x;
    std::vector<int64_t> pad(2 * (x.dim() - 2), 0);
    pad.back() = 1;  // the zero row at index `total`
    return at::constant_pad_nd(x, pad).index_select(2, slot_rows);
  }
  // (1, H, n · 64, ...) → (1, H, total, ...)
  at::Tensor scatter(const at::Tensor& x) const { return packed() ? x.index_select(2, token_slots) : x; }
};

inline ChunkLayout packed_layout(const at::Tensor& cu_seqlens, const std::vector<int64_t>& offsets, int64_t total) {
  constexpr int64_t C = delta_tensor_core::kChunk;
  ChunkLayout layout;
  layout.offsets = cu_seqlens.contiguous();
  layout.sequences = static_cast<int64_t>(offsets.size()) - 1;
  std::vector<int32_t> chunk_offsets{0};
  std::vector<int64_t> slot_rows, token_slots(total), chunk_sequences;
  for (int64_t n = 0; n < layout.sequences; ++n) {
    const int64_t begin = offsets[n], length = offsets[n + 1] - begin, chunks = (length + C - 1) / C;
    for (int64_t r = 0; r < chunks * C; ++r) {
      if (r < length) token_slots[begin + r] = static_cast<int64_t>(slot_rows.size());
      slot_rows.push_back(r < length ? begin + r : total);
    }
    chunk_sequences.insert(chunk_sequences.end(), chunks, n);
    chunk_offsets.push_back(static_cast<int32_t>(chunk_offsets.back() + chunks));
  }
  layout.chunks = chunk_offsets.back();
  layout.chunk_starts.assign(chunk_offsets.begin(), chunk_offsets.end());
  const auto device = cu_seqlens.device();
  const auto longs = [&](const std::vector<int64_t>& x) {
    return at::tensor(x, at::TensorOptions().dtype(at::kLong)).to(device);
  };
  layout.chunk_offsets = at::tensor(chunk_offsets, at::TensorOptions().dtype(at::kInt)).to(device);
  layout.slot_rows = longs(slot_rows);
  layout.token_slots = longs(token_slots);
  layout.chunk_sequences = longs(chunk_sequences);
  return layout;
}

// The walks and the batched products over `layout` (at least one chunk; inputs checked). `launch`
// runs the two walks: launch.forward_keeping(problem), launch.backward_walk(problem).
template <typename Launch>
Gradients backward_walked(const at::Tensor& grad_out, const Optional& grad_final_state, const at::Tensor& q,
                          const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta, const Optional& log_gate,
                          const Optional& initial_state, bool causal, double scale, bool normalize_qk,
                          const ChunkLayout& layout, const Launch& launch) {
  using namespace delta_generic;
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), dk = q.size(3), dv = v.size(3);
  const int64_t states = layout.packed() ? layout.sequences : B;
  const auto f32 = q.options().dtype(at::kFloat);
  const at::Tensor b = beta.to(at::kFloat).contiguous();
  const at::Tensor g = log_gate.has_value() ? log_gate->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor initial = initial_state.has_value() ? initial_state->contiguous() : at::Tensor();
  const auto kept = [&] {
    return Kept{at::empty({B, H, layout.chunks, dk, dv}, f32), at::empty({B, H, T, dv}, f32), layout.chunk_offsets};
  };

  // 1. The state entering every chunk, u and the final state.
  const Kept forward_walk = kept();
  at::Tensor final_state = at::empty({states, H, dk, dv}, f32);
  launch_call(q, k, v, b, g, initial, final_state, nullptr, causal, scale, normalize_qk, layout.offsets,
              layout.sequences, [&](const auto& problem) { launch.forward_keeping(problem); }, forward_walk,
              delta_tensor_core::kWalkValueTile);

  // q and k as the batched products take them (normalised in fp32), dO with the scale; the rows
  // in the layout's chunks.
  at::Tensor qh = q.to(at::kFloat), kh = k.to(at::kFloat), rq, rk;
  if (normalize_qk) {
    std::tie(qh, rq) = normalized(q);
    std::tie(kh, rk) = normalized(k);
  }
  const Chunks c = prepare(layout.gather(qh), layout.gather(kh), layout.gather(v), layout.gather(beta),
                           log_gate.has_value() ? Optional(layout.gather(*log_gate)) : std::nullopt, causal);
  const auto chunked = [&](const at::Tensor& x) {
    return to_chunks(layout.gather(x), c.chunk, c.count, c.count * c.chunk - c.length);
  };
  const at::Tensor dO = chunked(grad_out.to(at::kFloat) * scale);
  at::Tensor dS = grad_final_state.has_value() ? grad_final_state->contiguous() : at::zeros({states, H, dk, dv}, f32);
  at::Tensor grad_q;
  if (!causal) {  // out = scale · Q S_T: per chunk, with the state of the chunk's sequence
    const at::Tensor final_of_chunk =
        layout.packed() ? final_state.index_select(0, layout.chunk_sequences).transpose(0, 1).unsqueeze(0)
                        : final_state.unsqueeze(2);
    grad_q = at::matmul(dO, final_of_chunk.transpose(-1, -2)).flatten(2, 3).narrow(2, 0, c.length);
    const at::Tensor per_chunk = at::matmul(c.q.transpose(-1, -2), dO);  // (B, H, n, dk, dv)
    at::Tensor summed;
    if (layout.packed()) {  // each sequence's chunks, which lie together (a sum each: deterministic)
      summed = at::empty({states, H, dk, dv}, f32);
      for (int64_t n = 0; n < states; ++n) {
        const int64_t first = layout.chunk_starts[n], count = layout.chunk_starts[n + 1] - first;
        summed[n].copy_(count > 0 ? per_chunk[0].narrow(1, first, count).sum(1) : at::zeros({H, dk, dv}, f32));
      }
    } else {
      summed = per_chunk.sum(2);
    }
    dS = (dS + summed).contiguous();
  }

  // 2. dS leaving every chunk, du and dS entering the first.
  const Kept backward_walk = kept();
  at::Tensor grad_initial = at::empty({states, H, dk, dv}, f32);
  launch_call(q, k, grad_out, b, g, dS, grad_initial, nullptr, causal, scale, normalize_qk, layout.offsets,
              layout.sequences, [&](const auto& problem) { launch.backward_walk(problem); }, backward_walk,
              delta_tensor_core::kWalkValueTile);

  // 3. The rest, parallel over the chunks.
  const Walks walks{forward_walk.chunk_states, chunked(forward_walk.chunk_values), backward_walk.chunk_states,
                    chunked(backward_walk.chunk_values)};
  auto [dq, dk_, dv_, dbeta, dgate, dinitial] =
      assemble_gradients(c, walks, dO, grad_q, causal, log_gate, at::kFloat, beta.scalar_type(), grad_initial);
  dq = layout.scatter(dq), dk_ = layout.scatter(dk_), dv_ = layout.scatter(dv_), dbeta = layout.scatter(dbeta);
  if (log_gate.has_value()) dgate = layout.scatter(dgate);
  if (normalize_qk) {
    dq = unnormalized_gradient(dq, qh, rq);
    dk_ = unnormalized_gradient(dk_, kh, rk);
  }
  return Gradients{dq.to(q.scalar_type()).contiguous(), dk_.to(q.scalar_type()).contiguous(),
                   dv_.to(q.scalar_type()).contiguous(), dbeta.contiguous(), dgate.contiguous(), dinitial};
}

template <typename Launch>
std::optional<Gradients> backward(const at::Tensor& grad_out, const Optional& grad_final_state, const at::Tensor& q,
                                  const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta,
                                  const Optional& log_gate, const Optional& initial_state,
                                  const Optional& cu_seqlens, bool causal, double scale, bool normalize_qk,
                                  int64_t max_shared_bytes, const Launch& launch) {
  const DeltaRuleSizes sizes = check_delta_rule_inputs(q, k, v, beta, log_gate, initial_state, cu_seqlens, scale);
  check_delta_rule_grads(grad_out, grad_final_state, q, v, sizes);
  if (!takes(q, v, log_gate, max_shared_bytes) ||
      delta_tensor_core::walk_shared_bytes_of(q.size(3), per_channel_gates(log_gate)) > max_shared_bytes) {
    return std::nullopt;
  }
  ChunkLayout layout;
  int64_t states = q.size(0);
  if (cu_seqlens.has_value()) {
    const std::vector<int64_t> offsets = read_packed_offsets(kDeltaRuleOp, *cu_seqlens, q.size(2));
    if (offsets.size() == 1) return std::nullopt;  // no sequence at all: delta_rule_bwd's shapes
    layout = packed_layout(*cu_seqlens, offsets, q.size(2));
    states = layout.sequences;
  } else {
    layout.chunks = (q.size(2) + delta_tensor_core::kChunk - 1) / delta_tensor_core::kChunk;
  }
  if (layout.chunks == 0) {  // no row at all: the state's gradient passes through
    const auto f32 = q.options().dtype(at::kFloat);
    const at::Tensor dS = grad_final_state.has_value() ? grad_final_state->clone()
                                                       : at::zeros({states, q.size(1), q.size(3), v.size(3)}, f32);
    return Gradients{at::zeros_like(q), at::zeros_like(k), at::zeros_like(v), at::zeros_like(beta),
                     log_gate.has_value() ? at::zeros_like(*log_gate) : at::empty({0}, f32), dS};
  }
  return backward_walked(grad_out, grad_final_state, q, k, v, beta, log_gate, initial_state, causal, scale,
                         normalize_qk, layout, launch);
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
