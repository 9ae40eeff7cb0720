// The fused linear attention operators' host side, shared by the CUDA kernels
// (fused_cuda_ops.cpp) and their CPU emulation (fused_emulated.cpp): check the inputs, allocate
// the outputs and describe each pass as a ScanProblem (fused_scan.h) or, for 16-bit inputs, as
// the tensor-core kernels' problems (tensor_core/); `launch(problem)` runs it on the device at
// hand. The forward is one pass; the backward three on SIMT (dq; dk; dv and the initial state's
// gradient) or two on tensor cores (dq; dk, dv and dS0), each reading the inputs again rather
// than saved chunk states.
#pragma once

#include "fused_scan.h"
#include "tensor_core/plan.h"
#include "kernel.h"
#include "op_checks.h"
#include "../common/tensor_views.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <optional>
#include <tuple>
#include <utility>
#include <vector>

namespace linattn {
namespace fused {

constexpr int64_t kTile = 32;      // V columns per block

// The longest chunk (32, 16 or 8 rows) whose shared memory fits in max_bytes; false if none.
template <typename scalar_t, typename acc_t>
bool fit_chunk(ScanProblem<scalar_t, acc_t>& p, int64_t max_bytes) {
  for (const int64_t chunk : {32, 16, 8}) {
    p.chunk = chunk;
    if (p.shared_elements() * static_cast<int64_t>(sizeof(acc_t)) <= max_bytes) return true;
  }
  return false;
}

// A (B, H, m, dv + 1) contiguous state, as is or transposed (rows = the augmented columns).
template <typename T>
StateView<T> state_view(T* data, const LinearAttentionShape& s, bool transposed) {
  return augmented_state_view(data, s.feature_dim, s.value_dim, transposed);
}

// The call's sizes, options and inputs, which the SIMT scan's and the tensor-core forward's
// problems both describe.
template <typename Problem, typename scalar_t>
void describe_call(Problem& p, const LinearAttentionShape& s, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const bool* key_padding) {
  p.batch = s.batch;
  p.heads = s.heads;
  p.q_len = s.q_len;
  p.k_len = s.k_len;
  p.feature_dim = s.feature_dim;
  p.value_dim = s.value_dim;
  p.feature_map = static_cast<int>(s.feature_map);
  p.normalize = s.normalize;
  p.eps = static_cast<decltype(p.eps)>(s.eps);
  p.causal = s.causal;
  p.q = view_of<scalar_t>(q);
  p.k = view_of<scalar_t>(k);
  p.v = view_of<scalar_t>(v);
  p.key_padding = key_padding;
}

template <typename scalar_t, typename acc_t>
ScanProblem<scalar_t, acc_t> problem_of(const LinearAttentionShape& s, const at::Tensor& q,
                                        const at::Tensor& k, const at::Tensor& v, const bool* mask) {
  ScanProblem<scalar_t, acc_t> p;
  describe_call<ScanProblem<scalar_t, acc_t>, scalar_t>(p, s, q, k, v, mask);
  p.tile = kTile;
  return p;
}

// A tensor-core problem's inputs: the call and whether q, k, v rows load as 16-byte copies.
template <typename Problem, typename scalar_t>
Problem tensor_core_inputs(const LinearAttentionShape& s, const at::Tensor& q, const at::Tensor& k,
                           const at::Tensor& v, const bool* mask) {
  Problem p;
  describe_call<Problem, scalar_t>(p, s, q, k, v, mask);
  p.q_vector = warp::vector_rows<scalar_t>(q);
  p.k_vector = warp::vector_rows<scalar_t>(k);
  p.v_vector = warp::vector_rows<scalar_t>(v);
  return p;
}

// The tensor-core forward's problem without its outputs.
template <typename scalar_t>
tensor_core::ForwardProblem<scalar_t> tensor_core_forward_inputs(const LinearAttentionShape& s, const at::Tensor& q,
                                                                 const at::Tensor& k, const at::Tensor& v,
                                                                 const bool* mask) {
  auto p = tensor_core_inputs<tensor_core::ForwardProblem<scalar_t>, scalar_t>(s, q, k, v, mask);
  p.value_tiles = tensor_core::value_tiles_of(s);
  return p;
}

// The tensor-core forward's problem; outputs contiguous.
template <typename scalar_t>
tensor_core::ForwardProblem<scalar_t> tensor_core_problem(const LinearAttentionShape& s, const at::Tensor& q,
                                                          const at::Tensor& k, const at::Tensor& v,
                                                          const bool* mask, StateView<const float> state_in,
                                                          StateView<float> state_out, at::Tensor& out,
                                                          at::Tensor& normalizer) {
  auto p = tensor_core_forward_inputs<scalar_t>(s, q, k, v, mask);
  p.state_in = state_in;
  p.state_out = state_out;
  p.out = out.data_ptr<scalar_t>();
  p.normalizer = normalizer.data_ptr<float>();
  return p;
}

// Packed sequences (cu_seqlens) as the tensor-core kernels take them: the offsets, contiguous,
// and the number of sequences (each with its own state). The offsets' values are checked here on
// CPU tensors (the emulation); on a GPU reading them would cost a device synchronisation, and the
// kernels clamp each sequence's rows into the packing instead (sequence_rows), so that bad offsets
// never reach memory out of bounds — the device-generic path's policy.
struct PackedRows {
  at::Tensor offsets;
  tensor_core::Packing packing;
};
inline PackedRows packed_rows(const std::optional<at::Tensor>& cu_seqlens, int64_t total) {
  PackedRows r;
  if (!cu_seqlens.has_value()) return r;
  if (cu_seqlens->is_cpu()) read_sequence_offsets(*cu_seqlens, total);
  r.offsets = cu_seqlens->contiguous();
  r.packing.offsets = r.offsets.const_data_ptr<int32_t>();
  r.packing.sequences = r.offsets.numel() - 1;
  return r;
}

// The states of a call: one per (batch, head), or per (sequence, head) when packed.
inline int64_t state_count(const LinearAttentionShape& s, const PackedRows& packed) {
  return tensor_core::sequence_count(packed.packing, s.batch);
}

// How the tensor-core kernels cut a call's sequences for `processors` SMs (tensor_core/plan.h).
inline tensor_core::Split split_of(const LinearAttentionShape& s, const PackedRows& packed, int64_t processors) {
  if (packed.offsets.defined()) return tensor_core::packed_split_for(s, packed.packing.sequences, processors);
  return tensor_core::split_for(s, processors);
}

// Whether the tensor cores take a fading state's log factors `log_decay`: causal self-attention
// whose factors are (B, H, T) on q's device, or (B, H, T, m) gates per channel where
// `per_channel_fits` (an instance for them fits: channels_fit, or channel_value_tile's backward).
inline bool takes_log_decay(const LinearAttentionShape& s, const at::Tensor& log_decay, const at::Tensor& q,
                            bool per_channel_fits = false) {
  const bool rows = log_decay.dim() == 3 ||
                    (per_channel_fits && log_decay.dim() == 4 && log_decay.size(3) == s.feature_dim);
  return s.causal && s.q_len == s.k_len && rows && log_decay.size(0) == s.batch && log_decay.size(1) == s.heads &&
         log_decay.size(2) == s.k_len && log_decay.device() == q.device();
}

// Whether the forward's instance for gates per channel fits a block's shared memory (feature dims
// up to 128: G beside a 256-wide chunk would not).
inline bool channels_fit(const LinearAttentionShape& s, int64_t max_shared_bytes) {
  return s.feature_dim <= 128 && tensor_core::shared_bytes_of(s.feature_dim, s.value_dim, true) <= max_shared_bytes;
}

// The forward, or nothing where no kernel takes the call (a block that does not fit; a fading
// state, `log_decay`, and packed sequences, `cu_seqlens` ((1, H, total, ·) inputs, states per
// sequence), run only on the tensor cores).
template <typename Launch>
std::optional<std::tuple<at::Tensor, at::Tensor, at::Tensor>> forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& initial_state, const std::optional<at::Tensor>& key_padding_mask,
    int64_t feature_map, bool causal, bool normalize, double eps, int64_t max_shared_bytes,
    const Launch& launch, const std::optional<at::Tensor>& log_decay = std::nullopt,
    const std::optional<at::Tensor>& cu_seqlens = std::nullopt) {
  if (cu_seqlens.has_value()) {
    check_no_padding_when_packed(key_padding_mask);
    check_varlen_forward_inputs(q, k, v, *cu_seqlens, log_decay, initial_state, feature_map, causal, eps);
  } else {
    check_forward_inputs(q, k, v, initial_state, key_padding_mask, feature_map, causal, eps);
  }
  const LinearAttentionShape s = kernel_shape(q, k, v, feature_map, causal, normalize, eps);
  const bool on_tensor_cores = tensor_core::takes(s, q.scalar_type(), max_shared_bytes);
  if ((log_decay.has_value() || cu_seqlens.has_value()) && !on_tensor_cores) return std::nullopt;
  at::Tensor decay;  // the log factors as the kernel reads them, (B, H, T[, m]) contiguous fp32
  if (log_decay.has_value()) {
    if (!takes_log_decay(s, *log_decay, q, channels_fit(s, max_shared_bytes))) return std::nullopt;
    decay = log_decay->to(at::kFloat).contiguous();
  }
  const PackedRows packed = packed_rows(cu_seqlens, s.q_len);
  const auto acc = q.options().dtype(accumulate_type(q.scalar_type()));
  auto out = at::empty({s.batch, s.heads, s.q_len, s.value_dim}, q.options());
  auto final_state = at::empty({state_count(s, packed), s.heads, s.feature_dim, s.value_dim + 1}, acc);
  auto normalizer = at::empty({s.batch, s.heads, s.q_len}, acc);
  at::Tensor initial, mask;  // contiguous copies where needed (optional_ptr)
  const bool* mask_ptr = optional_ptr<bool>(key_padding_mask, mask);
  if (on_tensor_cores) {
    // 16-bit inputs with head dims up to 256: the tensor-core scan (tensor_core/forward.h).
    const auto in = state_view<const float>(optional_ptr<float>(initial_state, initial), s, false);
    const tensor_core::Split split = split_of(s, packed, launch.processors());
    AT_DISPATCH_REDUCED_FLOATING_TYPES(q.scalar_type(), "linear_attn_fwd_fused", [&] {
      auto p = tensor_core_problem<scalar_t>(s, q, k, v, mask_ptr, in,
                                             state_view<float>(final_state.data_ptr<float>(), s, false), out,
                                             normalizer);
      if (decay.defined()) {
        p.log_decay = decay.const_data_ptr<float>();
        p.gate_per_channel = decay.dim() == 4;
      }
      p.packing = packed.packing;
      if (split.segments == 1) {
        launch(p);
      } else {
        tensor_core::split_forward(p, split, initial_state, final_state, launch, decay, packed.offsets);
      }
    });
    return std::make_tuple(out, final_state, normalizer);
  }
  bool fits = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "linear_attn_fwd_fused", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto p = problem_of<scalar_t, acc_t>(s, q, k, v, mask_ptr);
    p.p_rows = Rows::kQueryFeatures;
    p.k_rows = Rows::kKeyFeatures;
    p.v_rows = Rows::kAugmentedValues;
    p.reduction = s.feature_dim;
    p.v_cols = s.value_dim;
    p.extra_column = true;  // the normalizer column: every tile normalizes its own rows
    p.state_in = state_view<const acc_t>(optional_ptr<acc_t>(initial_state, initial), s, false);
    p.state_out = state_view<acc_t>(final_state.data_ptr<acc_t>(), s, false);
    p.epilogue = Epilogue::kOutput;
    p.out = out.data_ptr<scalar_t>();
    p.normalizer = normalizer.data_ptr<acc_t>();
    fits = fit_chunk(p, max_shared_bytes);
    if (fits) launch(p);
  });
  if (!fits) return std::nullopt;
  return std::make_tuple(out, final_state, normalizer);
}

// The backward's outputs, uninitialized: dq, dk, dv (the inputs' dtype) and the gradient of the
// `states` initial states (the accumulation dtype `acc`).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> empty_gradients(const LinearAttentionShape& s,
                                                                                  int64_t states,
                                                                                  const at::TensorOptions& options,
                                                                                  const at::TensorOptions& acc) {
  return {at::empty({s.batch, s.heads, s.q_len, s.feature_dim}, options),
          at::empty({s.batch, s.heads, s.k_len, s.feature_dim}, options),
          at::empty({s.batch, s.heads, s.k_len, s.value_dim}, options),
          at::empty({states, s.heads, s.feature_dim, s.value_dim + 1}, acc)};
}

// Adds ⟨dS_N, S_N⟩ (per state: (states, H)) to dL/dc (B, H, T) at each sequence's last row: row
// T − 1, or with packed sequences the row before each offset but the first (an empty sequence's
// term is 0, and its index clamped into the packing). On the device, no synchronisation. Gates per
// channel: the states' row products (states, H, m) into dL/dc (B, H, T, m).
inline void add_final_state_terms(at::Tensor& grad_cumulative, const at::Tensor& terms, const PackedRows& packed) {
  const int64_t T = grad_cumulative.size(2);
  if (T == 0) return;
  if (!packed.offsets.defined()) {
    grad_cumulative.select(2, T - 1).add_(terms);
    return;
  }
  const at::Tensor ends = packed.offsets.slice(0, 1).to(at::kLong);
  const at::Tensor starts = packed.offsets.slice(0, 0, -1).to(at::kLong);
  const at::Tensor last_rows = (ends - 1).clamp(0, T - 1);
  std::vector<int64_t> shape(static_cast<size_t>(terms.dim()), 1);
  shape[0] = -1;
  const at::Tensor present = (ends > starts).to(terms.scalar_type()).view(shape);  // (N, 1[, 1])
  const at::Tensor per_row = (terms * present).transpose(0, 1);                    // (H, N[, m])
  grad_cumulative.select(0, 0).index_add_(1, last_rows, per_row);
}

// Where a head-dim tile of the tensor-core backward puts its dq, dk and dv (tensor_core_backward):
// into columns of the call's gradients, through fp32 sums where a gradient sums over tiles.
struct GradientTiles {
  at::Tensor q, k, v;       // the call's (B, H, T, ·) gradients
  int64_t q0 = 0, v0 = 0;   // the tile's first feature and value column
  tensor_core::GradientTile q_tile, k_tile, v_tile;
};

// The tensor-core backward (tensor_core/backward.h) of a call the kernels take whole (head dims up
// to kBackwardTile): dq, dk, dv, dS0 and, with a fading state (`decay`: (B, H, T) fp32 contiguous
// log factors, else undefined), dL/dc for c = cumsum(log factors): the passes' row terms
// φ(q)·dφ(q) − φ(k)·dφ(k), and ⟨dS_N, S_N⟩ at the last row (S_N: the final state the query pass
// reaches). `packed`: packed sequences, or none. With `tiles` (a tile of a wider call) dq, dk and
// dv go where it says instead (and are returned undefined).
template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> tensor_core_backward_whole(
    const LinearAttentionShape& s, const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_final_state,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& normalizer, const std::optional<at::Tensor>& initial_state,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& final_state,
    const at::Tensor& decay, const PackedRows& packed, const Launch& launch, const GradientTiles* tiles = nullptr) {
  const auto acc = q.options().dtype(at::kFloat);
  const int64_t states = state_count(s, packed);
  // (Named tensors, not a structured binding: the dispatch lambdas capture them.)
  at::Tensor grad_q, grad_k, grad_v, grad_initial;
  if (tiles == nullptr) {
    std::tie(grad_q, grad_k, grad_v, grad_initial) = empty_gradients(s, states, q.options(), acc);
  } else {
    grad_initial = at::empty({states, s.heads, s.feature_dim, s.value_dim + 1}, acc);
  }
  at::Tensor initial, grad_final, final, mask;  // contiguous copies where needed (optional_ptr)
  const bool* mask_ptr = optional_ptr<bool>(key_padding_mask, mask);
  const at::Tensor den = normalizer.contiguous();
  const bool fading = decay.defined(), per_channel = fading && decay.dim() == 4;
  // A fading state: each row's terms of dL/dc (gates per channel: dL/dc itself, (B, H, T, m)), and
  // the final state the query pass reaches where dS_N meets it.
  const at::Tensor row_terms =
      fading ? at::empty({s.batch, s.heads, s.q_len, per_channel ? s.feature_dim : 4}, acc) : at::Tensor();
  at::Tensor reached;
  const tensor_core::Split split = split_of(s, packed, launch.processors());
  AT_DISPATCH_REDUCED_FLOATING_TYPES(q.scalar_type(), "linear_attn_bwd_fused", [&] {
    auto p = tensor_core_inputs<tensor_core::BackwardProblem<scalar_t>, scalar_t>(s, q, k, v, mask_ptr);
    p.grad_out = view_of<scalar_t>(grad_out);
    p.out = view_of<scalar_t>(out);
    p.grad_vector = warp::vector_rows<scalar_t>(grad_out);
    p.normalizer = den.const_data_ptr<float>();
    if (tiles == nullptr) {
      p.grad_q = grad_q.data_ptr<scalar_t>();
      p.grad_k = grad_k.data_ptr<scalar_t>();
      p.grad_v = grad_v.data_ptr<scalar_t>();
    } else {
      p.grad_q = tiles->q.data_ptr<scalar_t>() + tiles->q0;
      p.grad_k = tiles->k.data_ptr<scalar_t>() + tiles->q0;
      p.grad_v = tiles->v.data_ptr<scalar_t>() + tiles->v0;
      p.grad_q_tile = tiles->q_tile;
      p.grad_k_tile = tiles->k_tile;
      p.grad_v_tile = tiles->v_tile;
    }
    const at::Tensor row_scalars = at::empty({s.batch, s.heads, s.q_len, tensor_core::kRowScalars}, acc);
    p.row_scalars = row_scalars.data_ptr<float>();
    if (fading) {
      p.log_decay = decay.const_data_ptr<float>();
      p.gate_per_channel = per_channel;
      p.row_terms = row_terms.data_ptr<float>();
    }
    p.packing = packed.packing;
    auto query = p;
    query.pass = tensor_core::BackwardPass::kQuery;
    query.state_in = state_view<const float>(optional_ptr<float>(initial_state, initial), s, false);
    if (!s.causal && final_state.has_value()) {
      // Non-causal, every query saw the forward's final state: no pass over the keys.
      query.state_in = state_view<const float>(optional_ptr<float>(final_state, final), s, false);
      query.state_complete = true;
    }
    auto key_value = p;
    key_value.pass = tensor_core::BackwardPass::kKeyValue;
    key_value.state_in = state_view<const float>(optional_ptr<float>(grad_final_state, grad_final), s, false);
    key_value.state_out = state_view<float>(grad_initial.data_ptr<float>(), s, false);
    if (split.segments == 1) {
      if (fading && grad_final_state.has_value()) {
        reached = at::empty({states, s.heads, s.feature_dim, s.value_dim + 1}, acc);
        query.state_out = state_view<float>(reached.data_ptr<float>(), s, false);
      }
      launch(query);
      launch(key_value);
      return;
    }
    // Long sequences, too few blocks: split them.
    reached = tensor_core::split_backward(query, key_value, split, initial_state, final_state, grad_final_state,
                                          grad_initial, launch, decay, packed.offsets);
  });
  at::Tensor grad_cumulative = at::empty({0}, acc);  // (none without a fading state)
  if (fading) {
    grad_cumulative = per_channel ? row_terms
                                  : row_terms.select(-1, 0) + row_terms.select(-1, 1) - row_terms.select(-1, 2) -
                                        row_terms.select(-1, 3);
    if (grad_final_state.has_value()) {
      const at::Tensor products = *grad_final_state * reached;
      add_final_state_terms(grad_cumulative, per_channel ? products.sum(-1) : products.sum({-2, -1}), packed);
    }
  }
  return {grad_q, grad_k, grad_v, grad_initial, grad_cumulative};
}

// Where the tiles of a head dim lie: [offset, offset + width) pieces of at most kBackwardTile
// columns (offsets multiples of it, so 16-byte rows stay 16-byte rows); one empty piece for d = 0.
inline std::vector<std::pair<int64_t, int64_t>> head_dim_tiles(int64_t d,
                                                               int64_t width = tensor_core::kBackwardTile) {
  std::vector<std::pair<int64_t, int64_t>> tiles;
  for (int64_t offset = 0; offset == 0 || offset < d; offset += width) {
    tiles.emplace_back(offset, std::min(width, d - offset));
  }
  return tiles;
}

// How tile i of n along a sum over tiles leaves its part (tensor_core::GradientTile), its fp32 sum
// `sum` (unused when n = 1), into a 16-bit gradient of row pitch `pitch`.
inline tensor_core::GradientTile gradient_tile(size_t i, size_t n, const at::Tensor& sum, int64_t pitch) {
  using tensor_core::Partial;
  tensor_core::GradientTile tile;
  tile.part = n == 1 ? Partial::kWhole : i == 0 ? Partial::kFirst : i + 1 == n ? Partial::kLast : Partial::kMiddle;
  tile.sum = n == 1 ? nullptr : sum.data_ptr<float>();
  tile.pitch = pitch;
  return tile;
}

// The tensor-core backward of a call it takes (tensor_core_backward_whole's outputs). Head dims
// above kBackwardTile (a block keeps Sᵀ or U, value × feature columns, in fp32 registers) run as
// one backward per (feature tile, value tile), one after another (docs/guide/cuda.md, "Head dims
// above 128"):
//   query pass: dφ(q)[f] = Σ over value tiles t of G[t] Sᵀ[t, f] + gn[t] z[f] + Σ_j (G_i[t] · v_j[t]
//     + gn_i[t]) φ(k_j)[f], with gn[t] = −G[t] · o[t] the tile's share of gn (they sum to it);
//   key-value pass: dv[t] = Σ over feature tiles f of φ(k)[f] U_v[f, t] + Σ_i (φ(k_j)[f] · φ(q_i)[f])
//     G_i[t]; dφ(k)[f] = Σ over value tiles of U_v[f, t] v_j[t] + u[f, t] + Σ_i (...) φ(q_i)[f].
// dq and dk[f] are sums over value tiles, dv[t] over feature tiles: fp32 sums (GradientTile), the
// last tile rounding the total into the 16-bit gradient. A tile's states are the (f, t) block of
// the call's with z (the forward's: in every value tile) or the final state's u column (dS_N's: in
// value tile 0 only, as the sums over tiles then count it once); dS0's u column and dL/dc are sums
// over the tiles.
template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> tensor_core_backward(
    const LinearAttentionShape& s, const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_final_state,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& normalizer, const std::optional<at::Tensor>& initial_state,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& final_state,
    const at::Tensor& decay, const PackedRows& packed, const Launch& launch,
    int64_t value_width = tensor_core::kBackwardTile) {
  const int64_t m = s.feature_dim, dv = s.value_dim;
  if (m <= tensor_core::kBackwardTile && dv <= value_width) {
    return tensor_core_backward_whole(s, grad_out, grad_final_state, q, k, v, out, normalizer, initial_state,
                                      key_padding_mask, final_state, decay, packed, launch);
  }
  const auto acc = q.options().dtype(at::kFloat);
  const auto feature_tiles = head_dim_tiles(m), value_tiles = head_dim_tiles(dv, value_width);
  const size_t nf = feature_tiles.size(), nv = value_tiles.size();
  GradientTiles to;
  std::tie(to.q, to.k, to.v, std::ignore) = empty_gradients(s, 0, q.options(), acc);
  // fp32 sums, one per tile of a gradient that sums over more than one tile.
  std::vector<at::Tensor> q_sums(nf), k_sums(nf), v_sums(nv);
  for (size_t i = 0; i < nf && nv > 1; ++i) {
    q_sums[i] = at::empty({s.batch, s.heads, s.q_len, feature_tiles[i].second}, acc);
    k_sums[i] = at::empty({s.batch, s.heads, s.k_len, feature_tiles[i].second}, acc);
  }
  for (size_t i = 0; i < nv && nf > 1; ++i) {
    v_sums[i] = at::empty({s.batch, s.heads, s.k_len, value_tiles[i].second}, acc);
  }
  at::Tensor grad_initial = at::empty({state_count(s, packed), s.heads, m, dv + 1}, acc);
  grad_initial.select(-1, dv).zero_();
  at::Tensor grad_cumulative = at::empty({0}, acc);
  for (size_t fi = 0; fi < nf; ++fi) {
    const int64_t f0 = feature_tiles[fi].first, fw = feature_tiles[fi].second;
    for (size_t ti = 0; ti < nv; ++ti) {
      const int64_t v0 = value_tiles[ti].first, vw = value_tiles[ti].second;
      // The (f, t) block of a state, with its z / u column or zeros in its place.
      auto state_tile = [&](const std::optional<at::Tensor>& state, bool last_column) -> std::optional<at::Tensor> {
        if (!state.has_value()) return std::nullopt;
        const at::Tensor rows = state->narrow(-2, f0, fw);
        const at::Tensor last = rows.narrow(-1, dv, 1);
        return at::cat({rows.narrow(-1, v0, vw), last_column ? last : at::zeros_like(last)}, -1);
      };
      LinearAttentionShape tile = s;
      tile.feature_dim = fw;
      tile.value_dim = vw;
      to.q0 = f0;
      to.v0 = v0;
      to.q_tile = gradient_tile(ti, nv, q_sums[fi], m);
      to.k_tile = gradient_tile(ti, nv, k_sums[fi], m);
      to.v_tile = gradient_tile(fi, nf, v_sums[ti], dv);
      const auto grads = tensor_core_backward_whole(
          tile, grad_out.narrow(-1, v0, vw), state_tile(grad_final_state, ti == 0), q.narrow(-1, f0, fw),
          k.narrow(-1, f0, fw), v.narrow(-1, v0, vw), out.narrow(-1, v0, vw), normalizer,
          state_tile(initial_state, true), key_padding_mask, state_tile(final_state, true), decay, packed, launch,
          &to);
      const at::Tensor& tile_initial = std::get<3>(grads);
      const at::Tensor initial_rows = grad_initial.narrow(-2, f0, fw);
      initial_rows.narrow(-1, v0, vw).copy_(tile_initial.narrow(-1, 0, vw));
      initial_rows.select(-1, dv).add_(tile_initial.select(-1, vw));
      if (decay.defined()) {
        grad_cumulative = grad_cumulative.numel() == 0 ? std::get<4>(grads) : grad_cumulative + std::get<4>(grads);
      }
    }
  }
  return {to.q, to.k, to.v, grad_initial, grad_cumulative};
}

template <typename Launch>
std::optional<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>> backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_final_state,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& normalizer, const std::optional<at::Tensor>& initial_state,
    const std::optional<at::Tensor>& key_padding_mask, int64_t feature_map, bool causal,
    bool normalize, const std::optional<at::Tensor>& final_state, int64_t max_shared_bytes,
    const Launch& launch) {
  check_backward_inputs(grad_out, grad_final_state, q, k, v, out, normalizer, initial_state,
                        key_padding_mask, feature_map, causal, final_state);
  const LinearAttentionShape s = kernel_shape(q, k, v, feature_map, causal, normalize, 1.0);
  if (tensor_core::takes_backward(s, q.scalar_type(), max_shared_bytes)) {
    // 16-bit inputs with head dims up to 256: the tensor-core backward (tensor_core/backward.h).
    auto grads = tensor_core_backward(s, grad_out, grad_final_state, q, k, v, out, normalizer, initial_state,
                                      key_padding_mask, final_state, at::Tensor(), PackedRows(), launch);
    return std::make_tuple(std::get<0>(grads), std::get<1>(grads), std::get<2>(grads), std::get<3>(grads));
  }
  const auto acc = q.options().dtype(accumulate_type(q.scalar_type()));
  // (Named tensors, not a structured binding: the dispatch lambdas capture them.)
  at::Tensor grad_q, grad_k, grad_v, grad_initial;
  std::tie(grad_q, grad_k, grad_v, grad_initial) = empty_gradients(s, s.batch, q.options(), acc);
  at::Tensor initial, grad_final, final, mask;  // contiguous copies where needed (optional_ptr)
  const bool* mask_ptr = optional_ptr<bool>(key_padding_mask, mask);
  const at::Tensor den = normalizer.contiguous();
  bool fits = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "linear_attn_bwd_fused", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto base = problem_of<scalar_t, acc_t>(s, q, k, v, mask_ptr);
    base.grad_out = view_of<scalar_t>(grad_out);
    base.out_saved = view_of<scalar_t>(out);
    base.normalizer_saved = den.const_data_ptr<acc_t>();
    const acc_t* S0 = optional_ptr<acc_t>(initial_state, initial);
    const acc_t* dSN = optional_ptr<acc_t>(grad_final_state, grad_final);

    // dq_i = G'_i (S0 + Σ_{j<=i} φ(k_j) [v_j | 1]ᵀ)ᵀ, times φ'(q_i).
    auto dq = base;
    dq.p_rows = Rows::kAugmentedCotangent;
    dq.k_rows = Rows::kAugmentedValues;
    dq.v_rows = Rows::kKeyFeatures;
    dq.reduction = s.value_dim + 1;
    dq.v_cols = s.feature_dim;
    dq.state_in = state_view<const acc_t>(S0, s, true);
    if (!causal && final_state.has_value()) {
      // Non-causal, every query saw the forward's final state: no pass over the keys.
      dq.state_in = state_view<const acc_t>(optional_ptr<acc_t>(final_state, final), s, true);
      dq.state_complete = true;
    }
    dq.epilogue = Epilogue::kGradQuery;
    dq.out = grad_q.data_ptr<scalar_t>();

    // dk_j = [v_j | 1] (dS_N + Σ_{i>=j} φ(q_i) G'_iᵀ)ᵀ, times φ'(k_j).
    auto dk = base;
    dk.p_rows = Rows::kAugmentedValues;
    dk.k_rows = Rows::kAugmentedCotangent;
    dk.v_rows = Rows::kQueryFeatures;
    dk.reduction = s.value_dim + 1;
    dk.v_cols = s.feature_dim;
    dk.reverse = true;
    dk.state_in = state_view<const acc_t>(dSN, s, true);
    dk.epilogue = Epilogue::kGradKey;
    dk.out = grad_k.data_ptr<scalar_t>();

    // dv_j = φ(k_j)ᵀ (dS_N + Σ_{i>=j} φ(q_i) G'_iᵀ); the sum over every row is dS0.
    auto dv = base;
    dv.p_rows = Rows::kKeyFeatures;
    dv.k_rows = Rows::kQueryFeatures;
    dv.v_rows = Rows::kAugmentedCotangent;
    dv.reduction = s.feature_dim;
    dv.v_cols = s.value_dim;
    dv.extra_column = true;  // the normalizer column of dS0
    dv.reverse = true;
    dv.state_in = state_view<const acc_t>(dSN, s, false);
    dv.state_out = state_view<acc_t>(grad_initial.data_ptr<acc_t>(), s, false);
    dv.epilogue = Epilogue::kGradValue;
    dv.out = grad_v.data_ptr<scalar_t>();

    fits = fit_chunk(dq, max_shared_bytes) && fit_chunk(dk, max_shared_bytes) && fit_chunk(dv, max_shared_bytes);
    if (!fits) return;
    launch(dq);
    launch(dk);
    launch(dv);
  });
  if (!fits) return std::nullopt;
  return std::make_tuple(grad_q, grad_k, grad_v, grad_initial);
}

// The backward of a fading state (log_decay) and/or packed sequences (cu_seqlens) on the tensor
// cores, with dL/dc as the fifth gradient (undefined without a fading state), or nothing where they
// do not take the call (as `forward`'s).
template <typename Launch>
std::optional<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>> extended_backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_final_state,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& normalizer, const std::optional<at::Tensor>& initial_state,
    const std::optional<at::Tensor>& key_padding_mask, int64_t feature_map, bool causal,
    bool normalize, const std::optional<at::Tensor>& final_state, const std::optional<at::Tensor>& log_decay,
    const std::optional<at::Tensor>& cu_seqlens, int64_t max_shared_bytes, const Launch& launch) {
  if (cu_seqlens.has_value()) {
    check_no_padding_when_packed(key_padding_mask);
    check_varlen_backward_inputs(grad_out, grad_final_state, q, k, v, *cu_seqlens, log_decay, out, normalizer,
                                 initial_state, feature_map, causal, final_state);
  } else {
    check_backward_inputs(grad_out, grad_final_state, q, k, v, out, normalizer, initial_state,
                          key_padding_mask, feature_map, causal, final_state);
  }
  const LinearAttentionShape s = kernel_shape(q, k, v, feature_map, causal, normalize, 1.0);
  if (!tensor_core::takes_backward(s, q.scalar_type(), max_shared_bytes)) return std::nullopt;
  // Gates per channel: feature dims up to 128 (one feature tile, so dL/dc's columns are the tile's),
  // value columns in tiles of 64 (channel_value_tile).
  const int64_t channel_tile = s.feature_dim <= tensor_core::kBackwardTile
                                   ? tensor_core::channel_value_tile(s.feature_dim, max_shared_bytes)
                                   : 0;
  if (log_decay.has_value() && !takes_log_decay(s, *log_decay, q, channel_tile > 0)) return std::nullopt;
  const at::Tensor decay = log_decay.has_value() ? log_decay->to(at::kFloat).contiguous() : at::Tensor();
  const bool per_channel = decay.defined() && decay.dim() == 4;
  return tensor_core_backward(s, grad_out, grad_final_state, q, k, v, out, normalizer, initial_state,
                              key_padding_mask, final_state, decay, packed_rows(cu_seqlens, s.q_len), launch,
                              per_channel ? channel_tile : tensor_core::kBackwardTile);
}

}  // namespace fused
}  // namespace linattn
