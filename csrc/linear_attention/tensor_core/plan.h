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
#include <vector>

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
// 256 (a block holds U, feature dim × (value dim + 1), in fp32 registers, so the kernels take up to
// 128 of each and wider calls run as tiles: fused_plans.h, tensor_core_backward), shared memory
// that fits.
inline bool takes_backward(const LinearAttentionShape& s, at::ScalarType dtype, int64_t max_shared_bytes) {
  if (dtype != at::kBFloat16 && dtype != at::kHalf) return false;
  if (s.feature_dim > 256 || s.value_dim > 256 || !warp::tensor_cores_enabled()) return false;
  return backward_shared_bytes_of(std::min<int64_t>(s.feature_dim, kBackwardTile),
                                  std::min<int64_t>(s.value_dim, kBackwardTile)) <= max_shared_bytes;
}

// The value tiles of a call; one even without value columns (dv = 0), whose block still writes
// the normalizer and z.
inline int64_t value_tiles_of(const LinearAttentionShape& s) {
  const int64_t width = value_tile_width(s.feature_dim, s.value_dim);
  return std::max<int64_t>(1, (s.value_dim + width - 1) / width);
}

// The sequence split: a call whose (batch or packed sequence, head, value tile) blocks cannot fill
// the GPU's `processors` SMs cuts each sequence into `segments` of `rows_q` query and `rows_k` key
// rows (whole chunks, counted from the sequence's first row), a block per segment.
struct Split {
  int64_t segments = 1, rows_q = 0, rows_k = 0;
};
constexpr int64_t kMinimumSegment = 8 * kChunk;  // shorter segments spend more on states than they gain

// Rows per segment: `rows` cut into `segments` whole chunks.
inline int64_t segment_rows(int64_t rows, int64_t segments) {
  const int64_t per = (rows + segments - 1) / segments;
  return (per + kChunk - 1) / kChunk * kChunk;
}

// (B, H, T) rows: as many segments as fill the SMs, each at least kMinimumSegment rows long.
inline Split split_for(const LinearAttentionShape& s, int64_t processors) {
  const int64_t blocks = s.batch * s.heads * value_tiles_of(s);
  const int64_t rows = s.q_len > s.k_len ? s.q_len : s.k_len;
  if (blocks == 0 || blocks >= processors) return {};
  const int64_t wanted = (processors + blocks - 1) / blocks, longest = rows / kMinimumSegment;
  const int64_t segments = std::max<int64_t>(1, std::min(wanted, longest));
  if (segments == 1) return {};
  return {segments, segment_rows(s.q_len, segments), segment_rows(s.k_len, segments)};
}

// `sequences` packed sequences of `s.q_len` rows in all (batch 1). Their lengths are on the device
// (reading them would synchronise), so segments are sized for the mean length, enough of them
// that a sequence of the whole packed length is covered: a shorter sequence's blocks past its end
// have no rows (they write zero sums and leave). Every (sequence, head) has as many segment states
// as the longest sequence could need, each written, read and scanned, so their number is held to
// what one sequence of the packed length would have (a segment per kMinimumSegment rows, the
// unpacked split's bound: sequences · segments <= rows / kMinimumSegment) and to
// kPackedSegmentsPerWanted times the segments the SMs want. Many short sequences therefore stay
// whole (their blocks fill the GPU, or the states would cost more than the parallelism gains).
constexpr int64_t kPackedSegmentsPerWanted = 4;

inline Split packed_split_for(const LinearAttentionShape& s, int64_t sequences, int64_t processors) {
  const int64_t blocks = sequences * s.heads * value_tiles_of(s), total = s.q_len;
  if (blocks == 0 || blocks >= processors) return {};
  const int64_t wanted = (processors + blocks - 1) / blocks, mean = (total + sequences - 1) / sequences;
  const int64_t most = std::min(kPackedSegmentsPerWanted * wanted, total / (kMinimumSegment * sequences));
  if (most <= 1) return {};
  int64_t rows = std::max(kMinimumSegment, segment_rows(mean, wanted));
  if ((total + rows - 1) / rows > most) rows = segment_rows(total, most);
  const int64_t segments = (total + rows - 1) / rows;
  if (segments <= 1) return {};
  return {segments, rows, rows};
}

// Cuts a problem's rows into the split's segments (a block per (batch or sequence, head,
// segment); ForwardProblem and BackwardProblem alike).
template <typename Problem>
void cut_into_segments(Problem& p, const Split& split) {
  p.segments = split.segments;
  p.segment_rows_q = split.rows_q;
  p.segment_rows_k = split.rows_k;
}

// (B or N, H, segments, m, dv + 1) contiguous states, one per block of a split launch.
template <typename Problem>
at::Tensor segment_state_tensor(const Problem& p, int64_t segments, const at::TensorOptions& options) {
  return at::empty({sequence_count(p.packing, p.batch), p.heads, segments, p.feature_dim, p.value_dim + 1},
                   options);
}
template <typename T>
fused::StateView<T> segment_state_view(T* data, int64_t m, int64_t dv) {
  return fused::augmented_state_view<T>(data, m, dv, false);
}

// Each segment's Σ φ(k)[v | 1]ᵀ over its key rows (the forward's kSegmentStates launch).
template <typename scalar_t, typename Launch>
at::Tensor segment_state_sums(ForwardProblem<scalar_t> p, const Split& split, const at::TensorOptions& options,
                              const Launch& launch) {
  const at::Tensor sums = segment_state_tensor(p, split.segments, options);
  cut_into_segments(p, split);
  p.pass = Pass::kSegmentStates;
  p.state_in = {};
  p.state_out = segment_state_view(sums.data_ptr<float>(), p.feature_dim, p.value_dim);
  launch(p);
  return sums;
}

// From per-segment sums (B, H, segments, m, dv + 1) and the state before the first row (or none):
// their total plus it, and the state each segment's scan starts from: causal, that plus the sums
// of the segments before it (`reverse`: after it, for a scan backwards in time); non-causal, the
// total for every segment. fp32 ATen ops in a fixed order: deterministic.
struct SegmentStarts {
  at::Tensor total, starts;
};
inline SegmentStarts segment_starts(const at::Tensor& sums, const std::optional<at::Tensor>& first, bool causal,
                                    bool reverse) {
  SegmentStarts result;
  result.total = sums.sum(2);
  if (first.has_value()) result.total.add_(*first);
  if (causal) {
    result.starts = (reverse ? sums.flip(2).cumsum(2).flip(2) : sums.cumsum(2)).sub_(sums);
    if (first.has_value()) result.starts.add_(first->unsqueeze(2));
  } else {
    result.starts = result.total.unsqueeze(2).expand(sums.sizes()).contiguous();
  }
  return result;
}

// e^{A_s} per (batch or packed sequence, head, segment s): A_s the sum of the log factors
// (B, H, T) fp32 over the segment's rows; gates per channel ((B, H, T, m)): per channel as well,
// (B or N, H, segments, m). Packed sequences (`offsets`: (N + 1) int32 on the factors' device)
// take differences of a float64 running sum (which keep fp32's accuracy at any length) at their
// segments' bounds, the offsets clamped into the packing as the kernels clamp them: no
// synchronisation.
inline at::Tensor segment_fades(const at::Tensor& log_decay, const Split& split, const at::Tensor& offsets) {
  const int64_t segments = split.segments, rows = split.rows_k, length = log_decay.size(2);
  const bool per_channel = log_decay.dim() == 4;
  const at::Tensor by_rows = per_channel ? log_decay.movedim(3, 2) : log_decay;  // rows last
  at::Tensor fades;  // (B or N, H[, m], segments)
  if (!offsets.defined()) {
    const at::Tensor padded = at::constant_pad_nd(by_rows, {0, segments * rows - length});
    std::vector<int64_t> shape = padded.sizes().vec();
    shape.back() = segments;
    shape.push_back(rows);
    fades = padded.reshape(shape).sum(-1).exp_();
  } else {
    const at::Tensor running = at::constant_pad_nd(by_rows.select(0, 0).to(at::kDouble).cumsum(-1), {1, 0});
    const at::Tensor bounds = offsets.to(at::kLong).clamp(0, length);
    const at::Tensor first = bounds.slice(0, 0, -1), end = at::maximum(bounds.slice(0, 1), first);
    const at::Tensor steps = at::arange(segments + 1, bounds.options()) * rows;  // each segment's start, and the end
    const at::Tensor rows_at = at::minimum(first.unsqueeze(1) + steps, end.unsqueeze(1));  // (N, segments + 1)
    std::vector<int64_t> shape = running.sizes().vec();  // (H[, m], N, segments + 1)
    shape.back() = first.size(0);
    shape.push_back(segments + 1);
    const at::Tensor sums = running.index_select(-1, rows_at.flatten()).view(shape);
    fades = (sums.narrow(-1, 1, segments) - sums.narrow(-1, 0, segments)).to(at::kFloat).movedim(-2, 0).exp_();
  }
  return per_channel ? fades.movedim(2, 3) : fades;
}

// segment_starts for a fading state (causal): a segment's sums are what its keys add by its end,
// and every state fades by e^{A_s} across segment s (`fades`, segment_fades), so the starts are a
// scan over segments, start_{s+1} = e^{A_s} start_s + sums_s, from the state before the first row
// — no positive exponent; fp32 ATen ops in a fixed order (segments of one launch: a few dozen at
// most). `reverse`: the scan backwards in time of the backward's U (sums faded to their segment's
// start, `first` the state after the last row), start_{s−1} = e^{A_s} start_s + sums_s; total is
// then the state before the first row.
inline SegmentStarts fading_segment_starts(const at::Tensor& sums, const std::optional<at::Tensor>& first,
                                           const at::Tensor& fades, bool reverse = false) {
  const int64_t segments = sums.size(2);
  // Per token a state fades as a whole, per channel row by row.
  const at::Tensor factors = fades.dim() == 4 ? fades.unsqueeze(-1) : fades.unsqueeze(-1).unsqueeze(-1);
  SegmentStarts result;
  at::Tensor running = first.has_value() ? first->to(at::kFloat) : at::zeros_like(sums.select(2, 0));
  std::vector<at::Tensor> starts(static_cast<size_t>(segments));
  for (int64_t i = 0; i < segments; ++i) {
    const int64_t s = reverse ? segments - 1 - i : i;
    starts[static_cast<size_t>(s)] = running;
    running = running * factors.select(2, s) + sums.select(2, s);
  }
  result.starts = at::stack(starts, 2).contiguous();
  result.total = running;
  return result;
}

// Runs p split (`split`): the segments' state sums (one launch), the state each segment's rows
// start from (segment_starts; fading_segment_starts with a fading state, `log_decay` being its
// (B, H, T) fp32 log factors, packed sequences' `offsets` for segment_fades), then every segment's
// outputs from it (one launch). Writes p's outputs and final_state ((B or N, H, m, dv + 1)).
template <typename scalar_t, typename Launch>
void split_forward(ForwardProblem<scalar_t> p, const Split& split, const std::optional<at::Tensor>& initial_state,
                   at::Tensor& final_state, const Launch& launch, const at::Tensor& log_decay = at::Tensor(),
                   const at::Tensor& offsets = at::Tensor()) {
  const at::Tensor sums = segment_state_sums(p, split, final_state.options(), launch);
  const SegmentStarts states =
      log_decay.defined()
          ? fading_segment_starts(sums, initial_state, segment_fades(log_decay, split, offsets))
          : segment_starts(sums, initial_state, p.causal, false);
  final_state.copy_(states.total);
  cut_into_segments(p, split);
  p.pass = Pass::kSegmentOutputs;
  p.state_in = segment_state_view(states.starts.const_data_ptr<float>(), p.feature_dim, p.value_dim);
  p.state_out = {};
  launch(p);
}

// Each segment's sums (B or N, H, segments, m, dv + 1) from pass `pass` of p cut by `split`
// (kQuerySums: [Σ φ(k) vᵀ | Σ φ(k)] over its key rows; kKeyValueSums: Σ φ(q) G'ᵀ over its query rows).
template <typename scalar_t, typename Launch>
at::Tensor backward_segment_sums(BackwardProblem<scalar_t> p, BackwardPass pass, const Split& split,
                                 const at::TensorOptions& options, const Launch& launch) {
  const at::Tensor sums = segment_state_tensor(p, split.segments, options);
  cut_into_segments(p, split);
  p.pass = pass;
  p.state_in = {};
  p.state_out = segment_state_view(sums.data_ptr<float>(), p.feature_dim, p.value_dim);
  launch(p);
  return sums;
}

// Runs the backward split by `split`:
//   1. the state each query segment starts from: each segment's [Σ φ(k) vᵀ | Σ φ(k)] (kQuerySums,
//      the query pass's own kernel, so that the states are those its scan would reach) and
//      segment_starts (non-causal with the forward's final state handed over: that, no launch);
//   2. the query pass per segment (dq, and the row scalars the other passes read);
//   3. each segment's Σ φ(q) G'ᵀ (kKeyValueSums) and segment_starts backwards in time from dS_N:
//      the U each key segment starts from, and dS0 (their total);
//   4. the key-value pass per segment (dk, dv).
// A fading state (`log_decay` (B, H, T) fp32, as the problems' log_decay) scans over segments with
// fading_segment_starts both ways (packed sequences: `offsets`, for segment_fades). Writes
// grad_initial; returns the final state step 1 reached (causal; a fading state's dL/dc takes it).
template <typename scalar_t, typename Launch>
at::Tensor split_backward(BackwardProblem<scalar_t> query, BackwardProblem<scalar_t> key_value, const Split& split,
                          const std::optional<at::Tensor>& initial_state, const std::optional<at::Tensor>& final_state,
                          const std::optional<at::Tensor>& grad_final_state, at::Tensor& grad_initial,
                          const Launch& launch, const at::Tensor& log_decay = at::Tensor(),
                          const at::Tensor& offsets = at::Tensor()) {
  const int64_t m = query.feature_dim, dv = query.value_dim;
  const bool causal = query.causal, fading = log_decay.defined();
  const auto options = grad_initial.options();
  const at::Tensor fades = fading ? segment_fades(log_decay, split, offsets) : at::Tensor();

  at::Tensor before, reached;
  if (causal || !final_state.has_value()) {
    const at::Tensor sums = backward_segment_sums(query, BackwardPass::kQuerySums, split, options, launch);
    const SegmentStarts starts = fading ? fading_segment_starts(sums, initial_state, fades)
                                        : segment_starts(sums, initial_state, causal, false);
    before = starts.starts;
    reached = starts.total;
  } else {
    const int64_t sequences = sequence_count(query.packing, query.batch);
    before = final_state->unsqueeze(2).expand({sequences, query.heads, split.segments, m, dv + 1}).contiguous();
  }
  cut_into_segments(query, split);
  query.state_in = segment_state_view(before.const_data_ptr<float>(), m, dv);
  query.state_out = {};
  query.state_complete = !causal;
  launch(query);

  const at::Tensor u_sums = backward_segment_sums(key_value, BackwardPass::kKeyValueSums, split, options, launch);
  const SegmentStarts after = fading ? fading_segment_starts(u_sums, grad_final_state, fades, true)
                                     : segment_starts(u_sums, grad_final_state, causal, true);
  grad_initial.copy_(after.total);
  cut_into_segments(key_value, split);
  key_value.state_in = segment_state_view(after.starts.const_data_ptr<float>(), m, dv);
  key_value.state_complete = !causal;
  key_value.state_out = {};
  launch(key_value);
  return reached;
}

}  // namespace tensor_core
}  // namespace linattn
