// Rows of a (B, H, T, D) tensor copied into a block's shared memory, written once for the
// tensor-core kernels (linear attention's forward, the restricted-softmax flash engine).
//
// A tile of kRows rows arrives in 16-byte pieces of 8 columns; piece e (row e / pieces per row,
// columns 8 (e % pieces per row) ..) is copied by thread e mod kThreads, so that a kernel can let
// each thread prepare (φ, masks, checks) exactly the pieces it copied, once its own copies have
// landed, without a barrier in between: each_piece walks the same assignment.
#pragma once

#include "warp_ops.h"
#include "../strided.h"

#include <cstdint>
#include <type_traits>

namespace linattn {
namespace warp {

// Where a tile's rows come from and go: rows [0, rows) and columns [0, dim) of x at (b, h) hold
// data; the tile is `cols` columns wide (a multiple of 8) and row r lands at `offset` + r · pitch.
template <typename scalar_t>
struct RowTile {
  const Strided4<const scalar_t>* x;
  bool vector;  // every row 16-byte aligned with unit column stride: 8 columns are one cp.async
  int64_t rows, dim;
  int cols, pitch;
  uint32_t offset;
};

// Calls piece(r, col) for each piece of a kRows-row tile that a lane of warp w owns (per lane).
template <int kThreads, int kRows, typename scalar_t, typename Piece>
LINATTN_HD void each_piece(const WarpContext& w, const RowTile<scalar_t>& x, Piece&& piece) {
  const int pieces_per_row = x.cols / 8, pieces = kRows * pieces_per_row;
  for_lanes(w, [&](int lane) {
    for (int e = w.warp * kWarpSize + lane; e < pieces; e += kThreads) {
      piece(e / pieces_per_row, e % pieces_per_row * 8);
    }
  });
}

// Copies kRows rows of x at (b, h) to shared offset base + x.offset, tile row r from row
// source(r) of x (−1: none, zeros): 16-byte cp.async where the row allows it, zeros past the end
// (rows or columns), element loads otherwise (strided or unaligned rows, a last partial piece).
// The caller commits and waits.
template <int kThreads, int kRows, typename scalar_t, typename Source>
LINATTN_HD void copy_rows_from(const WarpContext& w, const RowTile<scalar_t>& x, int64_t b, int64_t h, uint32_t base,
                               const Source& source) {
  each_piece<kThreads, kRows>(w, x, [&](int r, int col) {
    const int64_t row = source(r);
    const uint32_t dst = base + x.offset + static_cast<uint32_t>(r * x.pitch + col * 2);
    if (row < 0 || col >= x.dim) {
      // Plain stores: a zero-filling cp.async would still need an aligned source address, which
      // an unaligned tensor has nowhere to offer.
      LINATTN_UNROLL
      for (int i = 0; i < 4; ++i) store_shared<uint32_t>(w, dst + 4 * i, 0u);
    } else if (x.vector && col + 8 <= x.dim) {
      cp_async_16(w, dst, &x.x->at(b, h, row, col), 16);
    } else {
      LINATTN_UNROLL
      for (int i = 0; i < 8; ++i) {
        const scalar_t value = col + i < x.dim ? load_global(w, &x.x->at(b, h, row, col + i)) : scalar_t(0.0f);
        store_shared<uint16_t>(w, dst + 2 * i, value.x);
      }
    }
  });
}

// Rows [start, start + kRows) of x (zeros past x.rows).
template <int kThreads, int kRows, typename scalar_t>
LINATTN_HD void copy_rows(const WarpContext& w, const RowTile<scalar_t>& x, int64_t b, int64_t h, uint32_t base,
                          int64_t start) {
  copy_rows_from<kThreads, kRows>(w, x, b, h, base, [&](int r) { return start + r < x.rows ? start + r : -1; });
}

// Whether both halves of a 16-bit pair are finite (exponent bits not all ones).
template <typename half_t>
LINATTN_HD inline bool finite_pair(uint32_t pair) {
  constexpr uint32_t exponent = std::is_same_v<half_t, c10::Half> ? 0x7c00u : 0x7f80u;
  return (pair & exponent) != exponent && ((pair >> 16) & exponent) != exponent;
}

// Row pitch in shared memory for rows of `bytes`: 16 bytes past a multiple of 128, so the eight
// row addresses of an ldmatrix fall in eight different 16-byte bank groups (no conflicts).
LINATTN_HD constexpr int padded_pitch(int bytes) { return bytes + ((16 - bytes) % 128 + 128) % 128; }

// A B operand (16 rows k × 8 columns n) stored row by row from shared offset `origin`, `pitch`
// bytes apart: two 8×8 matrices (rows 0-7, 8-15) read transposed.
LINATTN_HD inline void rows_as_b_operand(const WarpContext& w, uint32_t origin, int pitch, Fragment (&bf)[2]) {
  Lanes<uint32_t> offset;
  for_lanes(w, [&](int lane) { offset[lane] = origin + ((lane / 8) % 2 * 8 + lane % 8) * pitch; });
  ldmatrix_x2<true>(w, bf, offset);
}

// An A operand (16 rows m × 16 columns k) stored row by row from shared offset `origin`.
LINATTN_HD inline void rows_as_a_operand(const WarpContext& w, uint32_t origin, int pitch, Fragment (&a)[4]) {
  Lanes<uint32_t> offset;
  for_lanes(w, [&](int lane) { offset[lane] = origin + (lane % 16) * pitch + lane / 16 * 16; });
  ldmatrix_x4<false>(w, a, offset);
}

// An A operand (16 rows m × 16 columns k) whose columns k are rows of shared memory (16 elements
// m along each row from `origin`): Kᵀ for a state update Kᵀ·V, four 8×8 matrices read transposed
// (matrix i: k + 8 (i / 2), m + 8 (i % 2)).
LINATTN_HD inline void rows_as_a_operand_transposed(const WarpContext& w, uint32_t origin, int pitch,
                                                    Fragment (&a)[4]) {
  Lanes<uint32_t> offset;
  for_lanes(w, [&](int lane) {
    const int m = lane / 8;
    offset[lane] = origin + (m / 2 * 8 + lane % 8) * pitch + m % 2 * 16;
  });
  ldmatrix_x4<true>(w, a, offset);
}

// A B operand whose 8 columns n are rows of shared memory (16 elements k along each row from
// `origin`): Kᵀ for scores Q·Kᵀ, two 8×8 matrices read as stored.
LINATTN_HD inline void rows_as_b_operand_transposed(const WarpContext& w, uint32_t origin, int pitch,
                                                    Fragment (&bf)[2]) {
  Lanes<uint32_t> offset;
  for_lanes(w, [&](int lane) { offset[lane] = origin + (lane % 8) * pitch + (lane / 8) % 2 * 16; });
  ldmatrix_x2<false>(w, bf, offset);
}

// Accumulator tiles (C fragments: 16 rows × 8 columns each, tile j at columns 8j), packed to 16
// bits and times `sign`, as the A fragments of their kTiles / 2 groups of 16 columns: the C
// fragments of two neighbouring tiles hold exactly the registers of one A fragment, so a product's
// result feeds the next product without leaving registers.
template <typename half_t, int kTiles>
LINATTN_HD void as_a_fragments(const WarpContext& w, const Accumulator (&c)[kTiles][4], Fragment (&a)[kTiles / 2][4],
                               float sign = 1.0f) {
  for_lanes(w, [&](int lane) {
    LINATTN_UNROLL
    for (int kk = 0; kk < kTiles / 2; ++kk) {
      LINATTN_UNROLL
      for (int i = 0; i < 4; ++i) {
        const Accumulator* tile = c[2 * kk + i / 2];
        a[kk][i][lane] = pack<half_t>(sign * tile[2 * (i % 2)][lane], sign * tile[2 * (i % 2) + 1][lane]);
      }
    }
  });
}

// Calls element(e) for e = this thread, + kThreads, ... below count: a block-wide loop over the
// elements of a small matrix in shared memory (a block of kThreads threads).
template <int kThreads, typename Element>
LINATTN_HD void each_block_element(const WarpContext& w, int count, const Element& element) {
  for_lanes(w, [&](int lane) {
    for (int e = w.warp * kWarpSize + lane; e < count; e += kThreads) element(e);
  });
}

// Calls element(row, col, x) for the lane's elements x of accumulator tiles (rows 0 .. 15, columns
// 0 .. 8 kTiles − 1 of the tiles side by side).
template <int kTiles, typename Element>
LINATTN_HD void each_accumulator(const WarpContext& w, Accumulator (&c)[kTiles][4], const Element& element) {
  for_lanes(w, [&](int lane) {
    const int g = group_of(lane), t = thread_in_group(lane);
    LINATTN_UNROLL
    for (int j = 0; j < kTiles; ++j) {
      LINATTN_UNROLL
      for (int i = 0; i < 4; ++i) element(g + 8 * (i / 2), j * 8 + 2 * t + i % 2, c[j][i][lane]);
    }
  });
}

// Sets accumulator tiles to 0.
template <int N>
LINATTN_HD void clear(const WarpContext& w, Accumulator (&tiles)[N][4]) {
  LINATTN_UNROLL
  for (int j = 0; j < N; ++j) {
    LINATTN_UNROLL
    for (int i = 0; i < 4; ++i) for_lanes(w, [&](int lane) { tiles[j][i][lane] = 0.0f; });
  }
}

}  // namespace warp
}  // namespace linattn
