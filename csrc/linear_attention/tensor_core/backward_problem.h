// What one launch of the tensor-core backward (backward.h) is given, the shared-memory layout of a
// block and the head-dim instances its kernels are compiled for.
#pragma once

#include "problem.h"

#include <algorithm>

namespace linattn {
namespace tensor_core {

// The two launches of the backward (docs/guide/cuda.md, "The tensor-core backward").
enum class BackwardPass : int {
  kQuery = 0,     // dq: a scan forwards in time with the state Sᵀ
  kKeyValue = 1,  // dk, dv and dS0: a scan backwards in time with U = dS_N + Σ φ(q) G'ᵀ
  // The sequence split only: each segment's Σ φ(q) G'ᵀ over its query rows to state_out.
  kKeyValueSums = 2,
  // The sequence split only: each segment's [Σ φ(k) vᵀ | Σ φ(k)] over its key rows to state_out
  // (the query pass's kernel, as its state takes them).
  kQuerySums = 3,
};

// How a tile of a wide backward (fused_plans.h, tensor_core_backward) leaves a gradient that is a
// sum over tiles: the first tile along the sum writes its fp32 part to `sum` ((B, H, T, tile
// width)), a middle one adds its own, the last adds its own and writes the total, rounded once,
// into its columns of the 16-bit gradient. Tiles run one after another on one stream: no atomics.
enum class Partial : int { kWhole = 0, kFirst = 1, kMiddle = 2, kLast = 3 };
struct GradientTile {
  Partial part = Partial::kWhole;
  float* sum = nullptr;
  int64_t pitch = 0;  // the 16-bit gradient's row pitch in elements (0: the tile's width)
};

// Everything one launch reads and writes; one block per (batch, head). The cotangent of the
// augmented output [numerator | normalizer] is G' = [G | gn] with G = g / d rounded to 16 bits and
// gn = −G · o (g = grad_out, o = out, d = the saved normalizer; [g | 0] unnormalized), 0 for a row
// whose g is all 0. The query pass reduces G · o as its rows land and writes each row's scalars
// (1 / d, or 0 for such a row, gn and σ; kRowScalars floats a row) to row_scalars, from which the
// other passes build the same G' without reading o. In float16 a row whose G' would pass
// kRowScaleLimit is held as G' / σ, σ a power of two (1 / d and gn are then stored divided by σ):
// the query pass multiplies the row's dφ(q) by σ, the others its φ(q) (every product they form is
// bilinear in φ(q_i) and G'_i), so a row that sees almost no key (d near eps) overflows nothing.
// At the other end a row whose largest |G| is below kRowSmallLimit (d large against g: a long
// sequence's later rows, a large state) takes σ about √max |G| (a power of two), splitting the
// product between the two factors so that neither falls into float16's subnormals (below 2^−14,
// where its spacing 2^−24 is coarse against G of 1e-7; φ(q) is about 1 with elu+1 and relu).
constexpr int kRowScalars = 3;
constexpr float kRowScaleLimit = 16384.0f;  // float16's G' stays within it (its range ends at 65504)
constexpr float kRowSmallLimit = 1.0f / 256.0f;  // 2^−8: float16's normals reach 6 binades below

template <typename scalar_t>
struct BackwardProblem {
  int64_t batch = 0, heads = 0, q_len = 0, k_len = 0, feature_dim = 0, value_dim = 0;
  int feature_map = kFeatureIdentity;
  bool normalize = true, causal = true;
  float eps = 1e-6f;  // (unused: the saved normalizer holds it)
  Strided4<const scalar_t> q, k, v, grad_out, out;
  // Whether rows load as 16-byte cp.async (ForwardProblem's q_vector).
  bool q_vector = false, k_vector = false, v_vector = false, grad_vector = false;
  const float* normalizer = nullptr;  // (B, H, T_q), the forward's (eps included)
  const bool* key_padding = nullptr;  // (B, T_k), true = padded, or null
  // A fading state (causal, T_q = T_k), as the forward's (ForwardProblem::log_decay), or null. The
  // passes then also write each row's terms of dL/dc (c = the cumulative log factors) to row_terms
  // (B, H, T, 4): φ(q)·dφ(q) in two halves of the features (query pass, [0] and [1]) and φ(k)·dφ(k)
  // (key-value pass, [2] and [3]); dL/dc = [0] + [1] − [2] − [3] (+ ⟨dS_N, S_N⟩ at the last row).
  // With gate_per_channel (GLA), log_decay is (B, H, T, m) and row_terms (B, H, T, m) holds dL/dc
  // itself, channel by channel: the query pass writes φ(q) ⊙ dφ(q), the key-value pass subtracts
  // φ(k) ⊙ dφ(k) in place (+ the final state's row terms at the last row, on the host).
  const float* log_decay = nullptr;
  bool gate_per_channel = false;
  float* row_terms = nullptr;
  BackwardPass pass = BackwardPass::kQuery;
  // kQuery: the forward's initial state (causal), or with state_complete its final state (non-
  // causal: every query saw it, so no pass over the keys); kKeyValue: dS_N, or with state_complete
  // U over every query (non-causal: no pass over the queries). (m, dv + 1) each, or null.
  fused::StateView<const float> state_in;
  bool state_complete = false;
  // kKeyValue: dS0; kKeyValueSums: the segments' sums; kQuery (causal, optional): the final state
  // [S | z] it reaches (a fading state's dL/dc takes ⟨dS_N, S_N⟩).
  fused::StateView<float> state_out;
  // The sequence split (long sequences with too few blocks to fill a GPU), as the forward's
  // (ForwardProblem): a block per (batch or sequence, head, segment) of segment_rows_q query and
  // segment_rows_k key rows; state views are indexed by block, holding the state the segment's
  // scan starts from (split_backward in plan.h builds them).
  int64_t segments = 1, segment_rows_q = 0, segment_rows_k = 0;
  scalar_t* grad_q = nullptr;         // (B, H, T_q, m) contiguous
  scalar_t* grad_k = nullptr;         // (B, H, T_k, m)
  scalar_t* grad_v = nullptr;         // (B, H, T_k, dv)
  // Head dims above the kernels' 128 run as tiles of features × value columns (fused_plans.h,
  // tensor_core_backward), whose gradients are partial sums over the other axis: where each of dq,
  // dk and dv goes (GradientTile). grad_q, grad_k and grad_v then point at the tile's first column.
  GradientTile grad_q_tile, grad_k_tile, grad_v_tile;
  float* row_scalars = nullptr;  // (B, H, T_q, kRowScalars): written by the query pass, read by the others
  // Packed sequences, as the forward's (ForwardProblem::packing): states per (sequence, head).
  Packing packing;

  LINATTN_HD int64_t blocks() const { return sequence_heads(packing, batch, heads) * segments; }
};

// Shared memory of one block: two chunk buffers, each with the chunk's φ(Q), φ(K), V and G' rows
// (G' with its normalizer column gn as two 16-bit parts hi + lo at DV and DV + 1, then zeros to
// DV + 8; in the query pass, which reads no column past DV + 1, float16's row scale σ as fp32 at
// DV + 2), flags (which rows hold Inf or NaN) and a fading state's log-factor rows; the 16-bit
// copy of the state as two 16-bit parts hi + lo (kKeyValue: U, DK rows of DV + 8 columns; kQuery:
// Sᵀ, DV rows of DK columns), so that the terms that cancel — G Sᵀ against gn z, U_v v_j against u
// — keep fp32's precision until their difference; kQuery's fp32 z = the column sums of φ(K) so
// far; a 16×16 fp32 scratch tile per warp; the warps' state sizes and scales (float16's copies
// hold the state divided by a power of two: state_scale.h). kChannels (gates per channel), as the
// forward's Layout: the chunk's G (one copy) and the diagonal blocks' pair weights (the key-value
// pass's dv).
template <int DK, int DV, bool kChannels = false>
struct BackwardLayout {
  static constexpr int kQKPitch = warp::padded_pitch(DK * 2), kVPitch = warp::padded_pitch(DV * 2);
  static constexpr int kGPitch = warp::padded_pitch((DV + 8) * 2);
  static constexpr int kQ = 0, kK = kQ + kChunk * kQKPitch, kV = kK + kChunk * kQKPitch;
  static constexpr int kG = kV + kChunk * kVPitch;
  // Flag bytes: φ(Q), φ(K), G (its value columns) hold Inf or NaN in this chunk.
  static constexpr int kFlags = kG + kChunk * kGPitch;
  static constexpr int kQueryFlag = 0, kKeyFlag = 1, kCotangentFlag = 2;
  // A fading state's fp32 rows (load_chunk_decay): b_r, e^{b_r}, e^{b_last − b_r}.
  static constexpr int kCumulativeDecay = kFlags + 16, kRowFade = kCumulativeDecay + kChunk * 4;
  static constexpr int kKeyFade = kRowFade + kChunk * 4;
  static constexpr int kBuffer = kKeyFade + kChunk * 4;
  static constexpr int kUPitch = kGPitch, kSPitch = kQKPitch;
  static constexpr int kState = 2 * kBuffer;
  static constexpr int kStateLow = kState + DV * kSPitch;  // kQuery: Sᵀ − hi
  static constexpr int kULow = kState + DK * kUPitch;      // kKeyValue: U − hi
  static constexpr int kZ = kState + std::max(2 * DK * kUPitch, 2 * DV * kSPitch);
  static constexpr int kScratch = kZ + DK * 4;
  static constexpr int kGatePitch = DK + 4;  // fp32 elements a row of G
  static constexpr int kStateScales = kScratch + kWarps * 16 * 16 * 4;  // float16's (state_scale.h)
  static constexpr int kGates = kStateScales + kStateScaleBytes;
  static constexpr int kDiagonal = kGates + kChunk * kGatePitch * 4;
  static constexpr int kBytes = kChannels ? kDiagonal + kChunk * 16 * 4 : kGates;
};

// The kernels compiled: feature and value dims each padded to 64 or 128 (one block owns the whole
// of both: the key gradient's scores reduce over every value column).
LINATTN_HD inline int padded_backward_dim(int64_t d) { return d <= 64 ? 64 : 128; }

// The widest head dims a kernel takes; wider calls run as tiles of at most this many features and
// value columns, tile by tile (fused_plans.h, tensor_core_backward).
constexpr int64_t kBackwardTile = 128;

// Calls f(std::integral_constant<int, DK>{}, std::integral_constant<int, DV>{}) for the kernel
// compiled for head dims dk and dv (both at most 128).
template <typename F>
void with_backward_head_dims(int64_t dk, int64_t dv, F&& f) {
  using k64 = std::integral_constant<int, 64>;
  using k128 = std::integral_constant<int, 128>;
  const int DK = padded_backward_dim(dk), DV = padded_backward_dim(dv);
  if (DK == 64 && DV == 64) f(k64{}, k64{});
  else if (DK == 64) f(k64{}, k128{});
  else if (DV == 64) f(k128{}, k64{});
  else f(k128{}, k128{});
}

inline int64_t backward_shared_bytes_of(int64_t dk, int64_t dv, bool per_channel = false) {
  int64_t bytes = 0;
  with_backward_head_dims(dk, dv, [&](auto k, auto v) {
    constexpr int DK = decltype(k)::value, DV = decltype(v)::value;
    bytes = per_channel ? BackwardLayout<DK, DV, true>::kBytes : BackwardLayout<DK, DV>::kBytes;
  });
  return bytes;
}

// The value columns a backward instance for gates per channel takes at once: 64 beside feature dim
// dk (<= 128), wider value dims running as tiles of 64, or 0 where that does not fit
// `max_shared_bytes` (the call then runs the device's own kernel). (128 columns: G does not fit
// beside 128 × 128, and the key-value pass at 64 × 128 spilled 184 bytes.)
constexpr int64_t kChannelValueTile = 64;
inline int64_t channel_value_tile(int64_t dk, int64_t max_shared_bytes) {
  return backward_shared_bytes_of(dk, kChannelValueTile, true) <= max_shared_bytes ? kChannelValueTile : 0;
}

// The registers a warp keeps across barriers: U = [U_v | u] (DK × (DV + 8), as the forward's
// state) in the key-value pass, Sᵀ (DV × DK) in the query pass.
template <int DK, int DV>
using KeyValueState = WarpState<DK, DV, 1>;
template <int DK, int DV>
using QueryState = WarpState<DV, DK, 0>;

}  // namespace tensor_core
}  // namespace linattn
