// When the tensor-core forward (forward.h) runs, its value tiles and its sequence split. Shared by
// the CUDA launch (fused_cuda_ops.cpp) and the CPU emulation (fused_emulated.cpp) through
// fused_plans.h, which builds the problem.
#pragma once

#include "backward_problem.h"
#include "../kernel.h"

#include "../../common/warp/host_settings.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>

namespace linattn {
namespace tensor_core {

// Whether the tensor-core forward takes this call: 16-bit inputs, head dims up to 256, and its
// shared memory fits in what a block may have.
inline bool takes(const LinearAttentionShape& s, at::ScalarType dtype, int64_t max_shared_bytes) {
  if (dtype != at::kBFloat16 && dtype != at::kHalf) return false;
  if (s.feature_dim > 256 || s.value_dim > 256 || !warp::tensor_cores_enabled()) return false;
  return shared_bytes_of(s.feature_dim, s.value_dim) <= max_shared_bytes;
}

// Whether the tensor-core backward (backward.h) takes this call: 16-bit inputs, head dims up to
// 128 (a block holds U, feature dim × (value dim + 1), in fp32 registers), shared memory that fits.
inline bool takes_backward(const LinearAttentionShape& s, at::ScalarType dtype, int64_t max_shared_bytes) {
  if (dtype != at::kBFloat16 && dtype != at::kHalf) return false;
  if (s.feature_dim > 128 || s.value_dim > 128 || !warp::tensor_cores_enabled()) return false;
  return backward_shared_bytes_of(s.feature_dim, s.value_dim) <= max_shared_bytes;
}

// The value tiles of a call; one even without value columns (dv = 0), whose block still writes
// the normalizer and z.
inline int64_t value_tiles_of(const LinearAttentionShape& s) {
  const int64_t width = value_tile_width(s.feature_dim, s.value_dim);
  return std::max<int64_t>(1, (s.value_dim + width - 1) / width);
}

// The sequence split: how many segments a call is cut into so that (batch, head, segment, value
// tile) blocks fill `processors` SMs, each segment at least kMinimumSegment rows long.
constexpr int64_t kMinimumSegment = 8 * kChunk;

inline int64_t segments_for(const LinearAttentionShape& s, int64_t processors) {
  const int64_t blocks = s.batch * s.heads * value_tiles_of(s);
  const int64_t rows = s.q_len > s.k_len ? s.q_len : s.k_len;
  if (blocks == 0 || blocks >= processors) return 1;
  const int64_t wanted = (processors + blocks - 1) / blocks, longest = rows / kMinimumSegment;
  return std::max<int64_t>(1, std::min(wanted, longest));
}

// Rows per segment: `rows` cut into `segments` whole chunks.
inline int64_t segment_rows(int64_t rows, int64_t segments) {
  const int64_t per = (rows + segments - 1) / segments;
  return (per + kChunk - 1) / kChunk * kChunk;
}

// Runs p split into `segments`: the segments' state sums (one launch), their prefix sums in ATen
// (fp32, a fixed order: deterministic), then every segment's outputs from the state before it
// (one launch). Writes p's outputs and final_state ((B, H, m, dv + 1)).
template <typename scalar_t, typename Launch>
void split_forward(ForwardProblem<scalar_t> p, int64_t segments, const std::optional<at::Tensor>& initial_state,
                   at::Tensor& final_state, const Launch& launch) {
  const int64_t m = p.feature_dim, w = p.value_dim + 1;
  const auto options = final_state.options();
  p.segments = segments;
  p.segment_rows_q = segment_rows(p.q_len, segments);
  p.segment_rows_k = segment_rows(p.k_len, segments);
  const at::Tensor sums = at::empty({p.batch, p.heads, segments, m, w}, options);
  auto states = p;
  states.pass = Pass::kSegmentStates;
  states.state_in = {};
  states.state_out = fused::augmented_state_view<float>(sums.data_ptr<float>(), m, p.value_dim, false);
  launch(states);
  at::Tensor total = sums.sum(2);
  if (initial_state.has_value()) total.add_(*initial_state);
  final_state.copy_(total);
  at::Tensor before;  // the state each segment's rows start from
  if (p.causal) {
    before = sums.cumsum(2).sub_(sums);
    if (initial_state.has_value()) before.add_(initial_state->unsqueeze(2));
  } else {
    before = total.unsqueeze(2).expand({p.batch, p.heads, segments, m, w}).contiguous();
  }
  auto outputs = p;
  outputs.pass = Pass::kSegmentOutputs;
  outputs.state_in = fused::augmented_state_view<const float>(before.data_ptr<float>(), m, p.value_dim, false);
  outputs.state_out = {};
  launch(outputs);
}

// Runs the backward split into `segments` (the views of the states below are (B, H, segments,
// m, dv + 1), contiguous):
//   1. the state each query segment starts from: the forward's segment sums Σ φ(k)[v | 1]ᵀ
//      (sums_problem, kSegmentStates) and their prefix (causal; non-causal: their total, or the
//      forward's final state when it is handed over, without a launch);
//   2. the query pass per segment (dq, and the row scalars the other passes read);
//   3. each segment's Σ φ(q) G'ᵀ (kKeyValueSums) and their suffix sums: the U each key segment
//      starts from (non-causal: the total), and dS0 = dS_N + their total;
//   4. the key-value pass per segment (dk, dv).
// Prefix and suffix sums are fp32 ATen ops in a fixed order: deterministic. Writes grad_initial.
template <typename scalar_t, typename Launch>
void split_backward(BackwardProblem<scalar_t> query, BackwardProblem<scalar_t> key_value,
                    ForwardProblem<scalar_t> sums_problem, int64_t segments,
                    const std::optional<at::Tensor>& initial_state, const std::optional<at::Tensor>& final_state,
                    const std::optional<at::Tensor>& grad_final_state, at::Tensor& grad_initial,
                    const Launch& launch) {
  const int64_t B = query.batch, H = query.heads, m = query.feature_dim, dv = query.value_dim;
  const bool causal = query.causal;
  const auto options = grad_initial.options();
  const int64_t rows_q = segment_rows(query.q_len, segments), rows_k = segment_rows(query.k_len, segments);
  auto split = [&](auto& problem) {
    problem.segments = segments;
    problem.segment_rows_q = rows_q;
    problem.segment_rows_k = rows_k;
  };
  auto every_segment = [&](const at::Tensor& state) {
    return state.unsqueeze(2).expand({B, H, segments, m, dv + 1}).contiguous();
  };
  auto view = [&](auto* data) { return fused::augmented_state_view(data, m, dv, false); };

  at::Tensor before;
  if (causal || !final_state.has_value()) {
    const at::Tensor sums = at::empty({B, H, segments, m, dv + 1}, options);
    split(sums_problem);
    sums_problem.pass = Pass::kSegmentStates;
    sums_problem.state_in = {};
    sums_problem.state_out = view(sums.data_ptr<float>());
    launch(sums_problem);
    if (causal) {
      before = sums.cumsum(2).sub_(sums);
      if (initial_state.has_value()) before.add_(initial_state->unsqueeze(2));
    } else {
      at::Tensor total = sums.sum(2);
      if (initial_state.has_value()) total.add_(*initial_state);
      before = every_segment(total);
    }
  } else {
    before = every_segment(*final_state);
  }
  split(query);
  query.state_in = view(before.const_data_ptr<float>());
  query.state_complete = !causal;
  launch(query);

  const at::Tensor u_sums = at::empty({B, H, segments, m, dv + 1}, options);
  auto sums_pass = key_value;
  split(sums_pass);
  sums_pass.pass = BackwardPass::kKeyValueSums;
  sums_pass.state_in = {};
  sums_pass.state_out = view(u_sums.data_ptr<float>());
  launch(sums_pass);
  at::Tensor total = u_sums.sum(2);
  if (grad_final_state.has_value()) total.add_(*grad_final_state);
  grad_initial.copy_(total);
  at::Tensor after;
  if (causal) {
    after = u_sums.flip(2).cumsum(2).flip(2).sub_(u_sums);
    if (grad_final_state.has_value()) after.add_(grad_final_state->unsqueeze(2));
  } else {
    after = every_segment(total);
  }
  split(key_value);
  key_value.state_in = view(after.const_data_ptr<float>());
  key_value.state_complete = !causal;
  key_value.state_out = {};
  launch(key_value);
}

}  // namespace tensor_core
}  // namespace linattn
