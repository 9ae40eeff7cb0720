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

// Packed sequences (flash-attn's cu_seqlens, batch 1): sequence n is rows [offsets[n],
// offsets[n + 1]) of every head (0 first, non-decreasing, the packed length last: checked on the
// host for CPU tensors, clamped by sequence_rows on a GPU) with a state of its own, a block per
// (sequence, head); `offsets` null: no packing.
struct Packing {
  const int32_t* offsets = nullptr;
  int64_t sequences = 0;
};

// Where the rows of block sequence `nh` ((batch or packed sequence) · heads + head) lie: the
// (batch, head) `bh` of the (B, H, T, ·) tensors that holds them (packed: batch 0) and its rows
// [first, q_end) of the queries and [first, k_end) of the keys. A GPU caller's offsets are not
// checked on the host (that would synchronise), so they are clamped into the packing: bad ones
// never reach memory out of bounds.
struct SequenceRows {
  int64_t bh = 0, b = 0, h = 0, first = 0, q_end = 0, k_end = 0;
};
LINATTN_HD inline SequenceRows sequence_rows(const Packing& packing, int64_t nh, int64_t heads, int64_t q_len,
                                             int64_t k_len) {
  SequenceRows r;
  r.h = nh % heads;
  if (packing.offsets == nullptr) {
    r.b = nh / heads;
    r.bh = nh;
    r.q_end = q_len;
    r.k_end = k_len;
  } else {
    const int64_t n = nh / heads, first = packing.offsets[n], end = packing.offsets[n + 1];
    r.bh = r.h;  // batch 0
    r.first = first < 0 ? 0 : first < q_len ? first : q_len;
    r.q_end = r.k_end = end < r.first ? r.first : end < q_len ? end : q_len;
  }
  return r;
}

// The number of batch entries, or of packed sequences: one state each per head.
LINATTN_HD inline int64_t sequence_count(const Packing& packing, int64_t batch) {
  return packing.offsets != nullptr ? packing.sequences : batch;
}

// The number of (batch or sequence, head) pairs a launch has blocks for.
LINATTN_HD inline int64_t sequence_heads(const Packing& packing, int64_t batch, int64_t heads) {
  return sequence_count(packing, batch) * heads;
}

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
  // A fading state (causal, T_q = T_k): (B, H, T) contiguous fp32 log factors a_t <= 0
  // (log γ of a per-head decay plus a log-gate), the state multiplied by e^{a_t} before token t
  // joins; null for none. With gate_per_channel (GLA), (B, H, T, m): row c of the state multiplied
  // by e^{a_tc} (the kernels' kChannels instances).
  const float* log_decay = nullptr;
  bool gate_per_channel = false;
  fused::StateView<const float> state_in;  // (m, dv + 1) per (batch, head), or null for zeros
  fused::StateView<float> state_out;       // or null
  scalar_t* out = nullptr;                 // (B, H, T_q, dv) contiguous
  float* normalizer = nullptr;             // (B, H, T_q)
  // The sequence split (long sequences with too few (batch or sequence, head) blocks to fill a
  // GPU; plan.h): each sequence's rows, from its first, are cut into `segments` of segment_rows_q
  // query / segment_rows_k key rows (multiples of the chunk; a packed sequence's segments past its
  // end are empty), a block per (batch or sequence, head, segment), in two launches with a prefix
  // sum between:
  //   kSegmentStates: block (bh, s) writes Σ φ(k)[v | 1]ᵀ over its key rows to state_out[bh·S + s];
  //   kSegmentOutputs: block (bh, s) reads the state before its rows (causal; non-causal: the
  //                    total) from state_in[bh·S + s] and writes its query rows' outputs.
  // State views are indexed by block; kWhole (one segment) is the unsplit kernel.
  Pass pass = Pass::kWhole;
  int64_t segments = 1, segment_rows_q = 0, segment_rows_k = 0;
  // Value dims wider than the kernel's DV run in tiles of DV columns, a block each (every tile
  // computes the normalizer; tile 0 writes it and the state's z column).
  int64_t value_tiles = 1;
  // Packed sequences (q_len = k_len, no key padding), or none. States are then per
  // (sequence, head), and a fading state's log factors (1, H, T).
  Packing packing;

  LINATTN_HD int64_t blocks() const { return sequence_heads(packing, batch, heads) * segments * value_tiles; }
};

// Shared memory of one block: two chunk buffers (Q, K and V rows, a non-finite flag, and for a
// fading state the chunk's cumulative log factors b_r = a_0 + ... + a_r with their exponentials),
// the 16-bit copy of the state [S | z 0 ... 0] (DK rows of DV + 8 columns), a scratch tile per
// warp and the warps' state sizes and scales (float16's; state_scale.h). kChannels (gates per channel): the chunk's cumulative log-gates G (kChunk rows of DK fp32
// channels; one copy, written in the phase that prepares the chunk, once the one before is done)
// and the pair weights of the causal scores' diagonal 16 × 16 blocks (fp32, row r's at kDiagonal
// + r · 16 · 4: ForwardBlock::diagonal_pairs).
constexpr int kStateScaleBytes = 2 * kWarps * 4;  // each warp's state size and scale (state_scale.h)

template <int DK, int DV, bool kChannels = false>
struct Layout {
  static constexpr int kQKPitch = warp::padded_pitch(DK * 2), kVPitch = warp::padded_pitch(DV * 2);
  static constexpr int kStatePitch = warp::padded_pitch((DV + 8) * 2);
  static constexpr int kQ = 0, kK = kQ + kChunk * kQKPitch, kV = kK + kChunk * kQKPitch;
  static constexpr int kNonFinite = kV + kChunk * kVPitch;  // a byte: the chunk's V holds Inf or NaN
  // A fading state's fp32 rows (ForwardBlock::load_decay): b_r, e^{b_r}, e^{b_last − b_r}.
  static constexpr int kCumulativeDecay = kNonFinite + 16, kRowFade = kCumulativeDecay + kChunk * 4;
  static constexpr int kKeyFade = kRowFade + kChunk * 4;
  static constexpr int kBuffer = kKeyFade + kChunk * 4;
  static constexpr int kState = 2 * kBuffer;
  static constexpr int kScratch = kState + DK * kStatePitch;  // per warp, 16x16 fp32: see diagonal_exactly
  static constexpr int kGatePitch = DK + 4;  // fp32 elements a row of G
  static constexpr int kStateScales = kScratch + kWarps * 16 * 16 * 4;  // float16's (state_scale.h)
  static constexpr int kGates = kStateScales + kStateScaleBytes;
  static constexpr int kDiagonal = kGates + kChunk * kGatePitch * 4;
  static constexpr int kBytes = kChannels ? kDiagonal + kChunk * 16 * 4 : kGates;
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

// The shared memory of one block for head dims dk and dv (per_channel: gates per channel).
inline int64_t shared_bytes_of(int64_t dk, int64_t dv, bool per_channel = false) {
  int64_t bytes = 0;
  with_head_dims(dk, dv, [&](auto k, auto v) {
    constexpr int DK = decltype(k)::value, DV = decltype(v)::value;
    bytes = per_channel ? Layout<DK, DV, true>::kBytes : Layout<DK, DV>::kBytes;
  });
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

  // Calls element(mine, row, col, x) for the lane's elements x of the warp's tiles (mine: the tile
  // is the warp's; past the last column tile it is not). The indices are computed afresh on every
  // call (warp::opaque): a kernel's loads at its start and stores at its end would otherwise share
  // them, kept live (or spilled) across the whole kernel.
  template <typename Element>
  LINATTN_HD void each_element(const WarpContext& w, const Element& element) {
    LINATTN_UNROLL
    for (int slot = 0; slot < kTilesPerWarp; ++slot) {
      int mi = 0, ni = 0;
      const bool mine = tile(warp::opaque_uniform(w.warp), slot, mi, ni);
      warp::for_lanes(w, [&](int lane_index) {
        const int lane = warp::opaque(lane_index);
        const int g = warp::group_of(lane), t = warp::thread_in_group(lane);
        LINATTN_UNROLL
        for (int i = 0; i < 4; ++i) {
          element(mine, mi * 16 + g + 8 * (i / 2), ni * 8 + 2 * t + i % 2, state[slot][i][lane]);
        }
      });
    }
  }

  // Adds column col + 1 into column col (even) and zeroes it: a value the state accumulated in two
  // parts (the backward's u, from gn's hi and lo columns of G').
  LINATTN_HD void fold_column_pair(const WarpContext& w, int col) {
    LINATTN_UNROLL
    for (int slot = 0; slot < kTilesPerWarp; ++slot) {
      int mi = 0, ni = 0;
      if (!tile(w.warp, slot, mi, ni)) continue;
      warp::for_lanes(w, [&](int lane) {
        if (ni * 8 + 2 * warp::thread_in_group(lane) != col) return;
        LINATTN_UNROLL
        for (int half = 0; half < 2; ++half) {
          state[slot][2 * half][lane] += state[slot][2 * half + 1][lane];
          state[slot][2 * half + 1][lane] = 0.0f;
        }
      });
    }
  }

  // The largest |x| of the warp's tiles as each lane holds them (Inf where one is Inf or NaN).
  LINATTN_HD void largest(const WarpContext& w, Lanes<float>& size) const {
    warp::for_lanes(w, [&](int lane) { size[lane] = 0.0f; });
    LINATTN_UNROLL
    for (int slot = 0; slot < kTilesPerWarp; ++slot) {
      int mi = 0, ni = 0;
      if (!tile(w.warp, slot, mi, ni)) continue;
      warp::for_lanes(w, [&](int lane) {
        LINATTN_UNROLL
        for (int i = 0; i < 4; ++i) {
          const float x = state[slot][i][lane];
          size[lane] = warp::finite_float(x) ? ::fmaxf(size[lane], ::fabsf(x)) : INFINITY;
        }
      });
    }
  }

  // The 16-bit copy the chunk's products read, at shared offset `origin`, `pitch` bytes a row; with
  // a `low` offset, the state as hi + lo (hi its 16-bit rounding, lo that of the rest). Each
  // element is multiplied by `scale` first (1 / σ, σ a power of two: exact; state_scale.h).
  template <typename half_t>
  LINATTN_HD void publish(const WarpContext& w, uint32_t origin, int pitch, uint32_t low = 0,
                          float scale = 1.0f) const {
    LINATTN_UNROLL
    for (int slot = 0; slot < kTilesPerWarp; ++slot) {
      int mi = 0, ni = 0;
      if (!tile(w.warp, slot, mi, ni)) continue;
      warp::for_lanes(w, [&](int lane) {
        const int g = warp::group_of(lane), t = warp::thread_in_group(lane);
        LINATTN_UNROLL
        for (int half = 0; half < 2; ++half) {
          const uint32_t offset = (mi * 16 + g + 8 * half) * pitch + (ni * 8 + 2 * t) * 2;
          const float x0 = state[slot][2 * half][lane] * scale, x1 = state[slot][2 * half + 1][lane] * scale;
          const uint32_t hi = warp::pack<half_t>(x0, x1);
          warp::store_shared<uint32_t>(w, origin + offset, hi);
          if (low != 0) {
            const uint32_t lo = warp::pack<half_t>(x0 - warp::unpack_lo<half_t>(hi), x1 - warp::unpack_hi<half_t>(hi));
            warp::store_shared<uint32_t>(w, low + offset, lo);
          }
        }
      });
    }
  }
};

// Column `col` of a block's state tiles in the (m, dv + 1) state: the block's `tile_cols` value
// columns from col0, then the extra tile, whose column 0 is the state's column dv (z, or u); −1
// for none.
LINATTN_HD inline int64_t augmented_state_column(int col, int tile_cols, int64_t col0, int64_t value_dim) {
  if (col >= tile_cols) return col == tile_cols ? value_dim : -1;
  return col0 + col < value_dim ? col0 + col : -1;
}

// The rows [begin, end) of rows [first, last) that segment `segment` of `segments` (segment_rows
// each) owns: all of them unless the sequence is split.
LINATTN_HD inline void segment_row_range(int64_t segments, int64_t segment, int64_t first, int64_t last,
                                         int64_t segment_rows, int64_t& begin, int64_t& end) {
  begin = first;
  end = last;
  if (segments == 1) return;
  begin = first + segment * segment_rows < last ? first + segment * segment_rows : last;
  end = begin + segment_rows < last ? begin + segment_rows : last;
}

}  // namespace tensor_core
}  // namespace linattn
