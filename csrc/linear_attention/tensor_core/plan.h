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

}  // namespace tensor_core
}  // namespace linattn
