// What one launch of the tensor-core forward (forward.h) is given, and the sizes its kernels are
// compiled for: the problem, the head-dim instances, the shared-memory layout of a block and the
// registers each warp keeps across barriers.
#pragma once

#include "../../common/warp/row_copy.h"
#include "../../common/strided.h"
#include "../fused_scan.h"

#include <cstdint>
#include <type_traits>

namespace linattn {
namespace tensor_core {

using warp::Accumulator;
using warp::Fragment;
using warp::Lanes;
using warp::WarpContext;

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * warp::kWarpSize;
constexpr int kChunk = 64;  // rows per chunk: 4 row blocks of 16

enum class Pass : int { kWhole = 0, kSegmentStates = 1, kSegmentOutputs = 2 };

// Everything one launch reads and writes; one block per (batch, head) (and segment).
template <typename scalar_t>
struct ForwardProblem {
  int64_t batch = 0, heads = 0, q_len = 0, k_len = 0, feature_dim = 0, value_dim = 0;
  int feature_map = kFeatureIdentity;
  bool normalize = true, causal = true;
  float eps = 1e-6f;
  Strided4<const scalar_t> q, k, v;
  // Whether every row of q / k / v starts 16-byte aligned with unit column stride, so 8 columns
  // load as one 16-byte cp.async (otherwise element by element).
  bool q_vector = false, k_vector = false, v_vector = false;
  const bool* key_padding = nullptr;  // (B, T_k), true = padded, or null
  fused::StateView<const float> state_in;  // (m, dv + 1) per (batch, head), or null for zeros
  fused::StateView<float> state_out;       // or null
  scalar_t* out = nullptr;                 // (B, H, T_q, dv) contiguous
  float* normalizer = nullptr;             // (B, H, T_q)
  // The sequence split (one long sequence has too few (batch, head) blocks to fill a GPU): the
  // rows are cut into `segments` of segment_rows_q query / segment_rows_k key rows (multiples of
  // the chunk), a block per (batch, head, segment), in two launches with a prefix sum between:
  //   kSegmentStates: block (bh, s) writes Σ φ(k)[v | 1]ᵀ over its key rows to state_out[bh·S + s];
  //   kSegmentOutputs: block (bh, s) reads the state before its rows (causal; non-causal: the
  //                    total) from state_in[bh·S + s] and writes its query rows' outputs.
  // State views are indexed by block; kWhole (one segment) is the unsplit kernel.
  Pass pass = Pass::kWhole;
  int64_t segments = 1, segment_rows_q = 0, segment_rows_k = 0;
  // Value dims wider than the kernel's DV run in tiles of DV columns, a block each (every tile
  // computes the normalizer; tile 0 writes it and the state's z column).
  int64_t value_tiles = 1;

  LINATTN_HD int64_t blocks() const { return batch * heads * segments * value_tiles; }
};

// Shared memory of one block: two chunk buffers (Q, K and V rows, a non-finite flag), the 16-bit
// copy of the state [S | z 0 ... 0] (DK rows of DV + 8 columns) and a scratch tile per warp.
template <int DK, int DV>
struct Layout {
  static constexpr int kQKPitch = warp::padded_pitch(DK * 2), kVPitch = warp::padded_pitch(DV * 2);
  static constexpr int kStatePitch = warp::padded_pitch((DV + 8) * 2);
  static constexpr int kQ = 0, kK = kQ + kChunk * kQKPitch, kV = kK + kChunk * kQKPitch;
  static constexpr int kNonFinite = kV + kChunk * kVPitch;  // a byte: the chunk's V holds Inf or NaN
  static constexpr int kBuffer = kNonFinite + 16;
  static constexpr int kState = 2 * kBuffer;
  static constexpr int kScratch = kState + DK * kStatePitch;  // per warp, 16x16 fp32: see diagonal_exactly
  static constexpr int kBytes = kScratch + kWarps * 16 * 16 * 4;
};

// The kernel a call runs: DK, its feature dim padded to 64, 128 or 256, and DV, the value columns
// a block takes (64 or 128; 64 beside DK = 256, whose state would not fit in registers otherwise).
LINATTN_HD inline int padded_feature_dim(int64_t dk) { return dk <= 64 ? 64 : dk <= 128 ? 128 : 256; }
LINATTN_HD inline int value_tile_width(int64_t dk, int64_t dv) { return dk > 128 || dv <= 64 ? 64 : 128; }

// Calls f(std::integral_constant<int, DK>{}, std::integral_constant<int, DV>{}) for the kernel
// compiled for head dims dk and dv.
template <typename F>
void with_head_dims(int64_t dk, int64_t dv, F&& f) {
  using k64 = std::integral_constant<int, 64>;
  using k128 = std::integral_constant<int, 128>;
  using k256 = std::integral_constant<int, 256>;
  const int DK = padded_feature_dim(dk), DV = value_tile_width(dk, dv);
  if (DK == 256) f(k256{}, k64{});
  else if (DK == 64 && DV == 64) f(k64{}, k64{});
  else if (DK == 64) f(k64{}, k128{});
  else if (DV == 64) f(k128{}, k64{});
  else f(k128{}, k128{});
}

// The shared memory of one block for head dims dk and dv.
inline int64_t shared_bytes_of(int64_t dk, int64_t dv) {
  int64_t bytes = 0;
  with_head_dims(dk, dv, [&](auto k, auto v) { bytes = Layout<decltype(k)::value, decltype(v)::value>::kBytes; });
  return bytes;
}

// A warp's registers that live across the block's barriers: its tiles of an fp32 state of
// kRows rows and kCols + kExtraCols·8 columns (the forward's [S | z]: DK × (DV + 8), its last
// 8-column tile holding z; the backward's (dS_N + Σ φ(q) G'ᵀ) alike, and its Sᵀ: DV × DK without
// an extra tile). Warp w owns kRowTilesPerWarp row tiles (16 rows each) of the state and, in each,
// a contiguous range of kColsPerWarp 8-column tiles, so its tiles of a row share one A fragment and
// their addresses differ by constants. (kRows <= 128: several warps share a row tile; kRows = 256:
// each warp has two.)
template <int kRows, int kCols, int kExtraCols = 1>
struct WarpState {
  static constexpr int kStateCols = kCols / 8 + kExtraCols;  // n8 tiles
  static constexpr int kRowTiles = kRows / 16;
  static_assert(kWarps % kRowTiles == 0 || kRowTiles % kWarps == 0, "row tiles spread evenly over warps");
  static constexpr int kRowTilesPerWarp = kRowTiles > kWarps ? kRowTiles / kWarps : 1;
  static constexpr int kWarpsPerRowTile = kRowTiles < kWarps ? kWarps / kRowTiles : 1;
  static constexpr int kColsPerWarp = (kStateCols + kWarpsPerRowTile - 1) / kWarpsPerRowTile;
  static constexpr int kTilesPerWarp = kRowTilesPerWarp * kColsPerWarp;
  Accumulator state[kTilesPerWarp][4];

  // Tile `slot` of warp w: its (row tile, column tile), or false past the last column tile.
  LINATTN_HD static bool tile(int warp_index, int slot, int& mi, int& ni) {
    mi = warp_index / kWarpsPerRowTile * kRowTilesPerWarp + slot / kColsPerWarp;
    ni = warp_index % kWarpsPerRowTile * kColsPerWarp + slot % kColsPerWarp;
    return ni < kStateCols;
  }
};

}  // namespace tensor_core
}  // namespace linattn
