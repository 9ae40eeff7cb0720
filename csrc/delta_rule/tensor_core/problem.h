// What one launch of the delta rule's tensor-core forward (forward.h) is given, and the sizes its
// kernels are compiled for: the problem, the head-dim instances and the shared-memory layout of a
// block. The registers each warp keeps across barriers are linear attention's WarpState (the
// state S, key dim × value tile, fp32, without an extra column tile).
#pragma once

#include "../../linear_attention/tensor_core/problem.h"

#include <cstdint>
#include <type_traits>

namespace linattn {
namespace delta_tensor_core {

using tensor_core::kChunk;
using tensor_core::kThreads;
using tensor_core::kWarps;
using warp::Accumulator;
using warp::Fragment;
using warp::Lanes;
using warp::WarpContext;

// Everything one launch reads and writes; one block per (batch or sequence, head, value tile).
template <typename scalar_t>
struct DeltaForwardProblem {
  int64_t batch = 0, heads = 0, length = 0, key_dim = 0, value_dim = 0;
  bool causal = true, normalize_qk = false;
  float scale = 1.0f;
  Strided4<const scalar_t> q, k, v;
  // Whether every row of q / k / v starts 16-byte aligned with unit column stride (row_copy.h).
  bool q_vector = false, k_vector = false, v_vector = false;
  const float* beta = nullptr;      // (B, H, T) contiguous
  const float* log_gate = nullptr;  // (B, H, T) contiguous, or null (DeltaNet)
  // Kimi Delta Attention: log_gate is (B, H, T, key_dim) contiguous, a gate per key channel (the
  // kChannels instances of the kernels take these calls).
  bool gate_per_channel = false;
  const float* state_in = nullptr;  // (B, H, dk, dv) contiguous, or null for zeros
  float* state_out = nullptr;       // (B, H, dk, dv) contiguous
  scalar_t* out = nullptr;          // (B, H, T, dv) contiguous, or null: the final state only
  // Value dims wider than the kernel's DV run in tiles of DV columns, a block each: the state's
  // columns, u's and the output's depend on the same columns of V and S only.
  int64_t value_tiles = 1;
  // Packed sequences (batch 1): sequence n is rows [offsets[n], offsets[n + 1]) (checked on the
  // host: 0 first, non-decreasing, `length` last) with its own state (N, H, dk, dv); null: none.
  const int32_t* offsets = nullptr;
  int64_t sequences = 0;
  // What the backward keeps of a walk (the kKeep instances write them): the state
  // at one boundary of every chunk, (B, H, ⌈T / 64⌉, dk, dv) fp32, and a row value per token,
  // (B, H, T, dv) fp32. The forward's keeping instance records the state entering each chunk and
  // u; the backward's walk (backward_walk.h) the gradient of the state leaving each chunk and du.
  float* chunk_states = nullptr;
  float* chunk_values = nullptr;
  // Packed and kept: sequence n's chunks are chunks chunk_offsets[n] .. of its head's
  // chunk_offsets[sequences] (chunk_states is then (1, H, Σ chunks, dk, dv)).
  const int32_t* chunk_offsets = nullptr;

  LINATTN_HD int64_t blocks() const { return (offsets != nullptr ? sequences : batch) * heads * value_tiles; }
};

// Shared memory of one block: two chunk buffers (Q, K and V rows), the 16-bit copy of the state
// (DK rows of DV columns), the chunk's per-row gate values, the fp32 matrices of the UT transform
// (A, its inverse T, a 32 × 32 product), T's two 16-bit forms, u and the non-finite screen; with
// gates per key channel (kChannels) the chunk's cumulative log-gates, 64 rows × DK channels fp32.
template <int DK, int DV, bool kChannels = false>
struct DeltaLayout {
  static constexpr int kQKPitch = warp::padded_pitch(DK * 2), kVPitch = warp::padded_pitch(DV * 2);
  static constexpr int kQ = 0, kK = kQ + kChunk * kQKPitch, kV = kK + kChunk * kQKPitch;
  static constexpr int kBuffer = kV + kChunk * kVPitch;
  static constexpr int kState = 2 * kBuffer;
  // Per row of the chunk, fp32: β, G (the cumulative log-gate), e^G and e^{G_last − G}.
  static constexpr int kBeta = kState + DK * kVPitch, kG = kBeta + kChunk * 4, kExpG = kG + kChunk * 4;
  static constexpr int kDecay = kExpG + kChunk * 4;
  static constexpr int kSquarePitch = kChunk + 4;  // fp32 elements a row of A and T
  static constexpr int kA = kDecay + kChunk * 4, kT = kA + kChunk * kSquarePitch * 4;
  static constexpr int kProductPitch = 32 + 4;
  static constexpr int kProduct = kT + kChunk * kSquarePitch * 4;
  static constexpr int kTPitch = warp::padded_pitch(kChunk * 2);  // T's 16-bit forms
  static constexpr int kTw = kProduct + 32 * kProductPitch * 4, kTu = kTw + kChunk * kTPitch;
  static constexpr int kU = kTu + kChunk * kTPitch;
  // The forward's screen for Inf and NaN (forward_block.h, screen_rows): a byte per chunk row, then
  // the first flagged row (int; kChunk for none).
  static constexpr int kRowFlags = kU + kChunk * kVPitch, kFirstBad = kRowFlags + kChunk;
  static constexpr int kGatePitch = DK + 4;  // fp32 elements a row of G (kChannels)
  static constexpr int kGates = kFirstBad + 16;
  static constexpr int kBytes = kChannels ? kGates + kChunk * kGatePitch * 4 : kGates;
};

// The kernel a call runs: DK, its key dim padded to 64 or 128, and DV, the value columns a block
// takes (64 or 128; always 64 with gates per key channel: their G would not fit beside 128).
constexpr int kChannelValueTile = 64;
LINATTN_HD inline int padded_key_dim(int64_t dk) { return dk <= 64 ? 64 : 128; }
LINATTN_HD inline int value_tile_width(int64_t dv, bool per_channel = false) {
  return per_channel ? kChannelValueTile : dv <= 64 ? 64 : 128;
}

// Calls f(std::integral_constant<int, DK>{}, std::integral_constant<int, DV>{}) for the kernel
// compiled for head dims dk (<= 128) and dv, gates per token or none.
template <typename F>
void with_head_dims(int64_t dk, int64_t dv, F&& f) {
  using k64 = std::integral_constant<int, 64>;
  using k128 = std::integral_constant<int, 128>;
  const int DK = padded_key_dim(dk), DV = value_tile_width(dv);
  if (DK == 64 && DV == 64) f(k64{}, k64{});
  else if (DK == 64) f(k64{}, k128{});
  else if (DV == 64) f(k128{}, k64{});
  else f(k128{}, k128{});
}

// Calls f(std::integral_constant<int, DK>{}) for the kernels compiled for key dim dk (<= 128) whose
// value tiles are fixed (the backward's walks, gates per key channel).
template <typename F>
void with_key_dim(int64_t dk, F&& f) {
  if (padded_key_dim(dk) == 64) f(std::integral_constant<int, 64>{});
  else f(std::integral_constant<int, 128>{});
}

inline int64_t shared_bytes_of(int64_t dk, int64_t dv, bool per_channel = false) {
  int64_t bytes = 0;
  if (per_channel) {
    with_key_dim(dk, [&](auto k) {
      bytes = DeltaLayout<decltype(k)::value, kChannelValueTile, true>::kBytes;
    });
  } else {
    with_head_dims(dk, dv, [&](auto k, auto v) { bytes = DeltaLayout<decltype(k)::value, decltype(v)::value>::kBytes; });
  }
  return bytes;
}

// The backward walk (backward_walk.h) takes 64 value columns a block whatever the value dim (a
// 128 × 128 block would not fit) and adds Y = −Twᵀ du (16-bit) to the forward's layout.
constexpr int kWalkValueTile = 64;

template <int DK, bool kChannels = false>
struct DeltaWalkLayout : DeltaLayout<DK, kWalkValueTile, kChannels> {
  using Base = DeltaLayout<DK, kWalkValueTile, kChannels>;
  static constexpr int kY = Base::kBytes;
  static constexpr int kBytes = kY + kChunk * Base::kVPitch;
};

inline int64_t walk_shared_bytes_of(int64_t dk, bool per_channel = false) {
  const bool narrow = padded_key_dim(dk) == 64;
  if (per_channel) return narrow ? DeltaWalkLayout<64, true>::kBytes : DeltaWalkLayout<128, true>::kBytes;
  return narrow ? DeltaWalkLayout<64>::kBytes : DeltaWalkLayout<128>::kBytes;
}

template <int DK, int DV>
using DeltaState = tensor_core::WarpState<DK, DV, 0>;

}  // namespace delta_tensor_core
}  // namespace linattn
