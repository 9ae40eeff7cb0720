// The tensor-core forward of linear attention (bf16 and fp16 inputs, fp32 accumulation), written
// once against the warp-operation layer (common/warp/) for the GPU and its CPU emulation.
//
// One block of 8 warps owns one (batch, head) and scans its sequence in chunks of 64 rows. The
// state St = [S | z] (feature dim × (value dim + 1), fp32) lives in the warps' mma accumulator
// registers from the first chunk to the last, never in global memory; a bf16/fp16 copy of it sits
// in shared memory for the chunk's queries to read. Per chunk (causal):
//   O   = φ(Q)·St_prev + mask(φ(Q) φ(K)ᵀ) · [V | 1]      scores and output on tensor cores
//   St += φ(K)ᵀ · [V | 1]
// and the output row is O's numerator over its last column (the normalizer) + eps. The ones
// column of [V | 1] is an extra 8-column mma tile generated in registers, so the normalizer is
// computed by the same instructions (and the same rounding of the scores) as the numerator.
// φ is applied to the fragments as ldmatrix delivers them, and is 0 for padded keys, rows past
// the end and columns past the head dim (which the loads zero-fill), so those add nothing.
// Non-causal: one pass accumulates St over every key chunk, a second reads every query chunk.
// The next chunk's rows are in flight (cp.async, double-buffered) while the current one computes.
//
// Warp w owns, for the output, query rows 16 (w % 4) .. +15 of the chunk and half the value
// columns (w / 4) plus the normalizer tile; for the state, a contiguous range of its 16×8 tiles.
#pragma once

#include "../../common/warp/warp_ops.h"
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

// Everything one launch reads and writes; one block per (batch, head).
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

  LINATTN_HD int64_t blocks() const { return batch * heads; }
};

// Row pitch in shared memory for rows of `bytes`: 16 bytes past a multiple of 128, so the eight
// row addresses of an ldmatrix fall in eight different 16-byte bank groups (no conflicts).
LINATTN_HD constexpr int padded_pitch(int bytes) { return bytes + ((16 - bytes) % 128 + 128) % 128; }

// Shared memory of one block: two chunk buffers (Q, K, V rows and the keys' validity flags) and
// the 16-bit copy of the state [S | z 0 ... 0] (DK rows of DV + 8 columns).
template <int DK, int DV>
struct Layout {
  static constexpr int kQKPitch = padded_pitch(DK * 2), kVPitch = padded_pitch(DV * 2);
  static constexpr int kStatePitch = padded_pitch((DV + 8) * 2);
  static constexpr int kQ = 0, kK = kQ + kChunk * kQKPitch, kV = kK + kChunk * kQKPitch;
  static constexpr int kValid = kV + kChunk * kVPitch;
  static constexpr int kBuffer = (kValid + kChunk + 15) / 16 * 16;
  static constexpr int kState = 2 * kBuffer;
  static constexpr int kBytes = kState + DK * kStatePitch;
};

// The head dims a kernel is compiled for: 64 or 128 (smaller dims run zero-padded to 64).
LINATTN_HD inline int padded_head_dim(int64_t dim) { return dim <= 64 ? 64 : 128; }

// Calls f(std::integral_constant<int, DK>{}, std::integral_constant<int, DV>{}) for the problem's
// compiled head dims.
template <typename scalar_t, typename F>
void with_head_dims(const ForwardProblem<scalar_t>& p, F&& f) {
  using k64 = std::integral_constant<int, 64>;
  using k128 = std::integral_constant<int, 128>;
  const bool dk64 = padded_head_dim(p.feature_dim) == 64, dv64 = padded_head_dim(p.value_dim) == 64;
  if (dk64 && dv64) f(k64{}, k64{});
  else if (dk64) f(k64{}, k128{});
  else if (dv64) f(k128{}, k64{});
  else f(k128{}, k128{});
}

// A warp's registers that live across the block's barriers: its tiles of the fp32 state.
template <int DK, int DV>
struct WarpState {
  static constexpr int kStateCols = DV / 8 + 1;  // n8 tiles: the values', then [z 0 ... 0]
  static constexpr int kStateTiles = DK / 16 * kStateCols;
  static constexpr int kTilesPerWarp = (kStateTiles + kWarps - 1) / kWarps;
  Accumulator state[kTilesPerWarp][4];
};

// φ of both halves of a 16-bit pair, 0 where not valid.
template <typename half_t>
LINATTN_HD inline uint32_t feature_pair(int map, uint32_t pair, bool valid_lo, bool valid_hi) {
  const float lo = valid_lo ? fused::feature<float>(map, warp::unpack_lo<half_t>(pair)) : 0.0f;
  const float hi = valid_hi ? fused::feature<float>(map, warp::unpack_hi<half_t>(pair)) : 0.0f;
  return warp::pack<half_t>(lo, hi);
}
LINATTN_HD inline uint32_t keep_pair(uint32_t pair, bool valid_lo, bool valid_hi) {
  return (valid_lo ? pair & 0xffffu : 0u) | (valid_hi ? pair & 0xffff0000u : 0u);
}

template <typename scalar_t, int DK, int DV>
struct ForwardBlock {
  using L = Layout<DK, DV>;
  using State = WarpState<DK, DV>;
  static constexpr int kColsPerHalf = DV / 16;  // value n8 tiles per output warp
  static constexpr int kOutTiles = kColsPerHalf + 1;  // plus the normalizer tile

  const ForwardProblem<scalar_t>& p;
  int64_t b, h, bh;

  LINATTN_HD ForwardBlock(const ForwardProblem<scalar_t>& problem, int64_t block)
      : p(problem), b(block / problem.heads), h(block % problem.heads), bh(block) {}

  LINATTN_HD static uint32_t buffer(int64_t chunk) { return static_cast<uint32_t>((chunk & 1) * L::kBuffer); }

  // --- loads -----------------------------------------------------------------------------------

  // Rows [start, start + 64) of one operand (dim columns of `cols` stored) into shared memory at
  // `base`: 16-byte cp.async where possible, zero-filled past the end, element loads otherwise.
  LINATTN_HD void load_rows(const WarpContext& w, const Strided4<const scalar_t>& x, bool vector, int64_t rows,
                            int64_t dim, int cols, int pitch, uint32_t base, int64_t start) const {
    const int pieces_per_row = cols / 8, pieces = kChunk * pieces_per_row;
    warp::for_lanes(w, [&](int lane) {
      for (int e = w.warp * warp::kWarpSize + lane; e < pieces; e += kThreads) {
        const int r = e / pieces_per_row, col = e % pieces_per_row * 8;
        const int64_t row = start + r;
        const uint32_t dst = base + static_cast<uint32_t>(r * pitch + col * 2);
        if (row >= rows || col >= dim) {
          warp::cp_async_16(w, dst, x.data, 0);
        } else if (vector && col + 8 <= dim) {
          warp::cp_async_16(w, dst, &x.at(b, h, row, col), 16);
        } else {
          LINATTN_UNROLL
          for (int i = 0; i < 8; ++i) {
            const scalar_t value = col + i < dim ? warp::load_global(w, &x.at(b, h, row, col + i)) : scalar_t(0.0f);
            warp::store_shared<uint16_t>(w, dst + 2 * i, value.x);
          }
        }
      }
    });
  }

  // Issues the loads of chunk `chunk` (Q rows and/or K, V rows with the keys' validity flags).
  LINATTN_HD void issue_chunk(const WarpContext& w, int64_t chunk, bool want_q, bool want_kv) const {
    const uint32_t base = buffer(chunk);
    const int64_t start = chunk * kChunk;
    if (want_q) load_rows(w, p.q, p.q_vector, p.q_len, p.feature_dim, DK, L::kQKPitch, base + L::kQ, start);
    if (want_kv) {
      load_rows(w, p.k, p.k_vector, p.k_len, p.feature_dim, DK, L::kQKPitch, base + L::kK, start);
      load_rows(w, p.v, p.v_vector, p.k_len, p.value_dim, DV, L::kVPitch, base + L::kV, start);
      if (w.warp < kChunk / warp::kWarpSize) {
        warp::for_lanes(w, [&](int lane) {
          const int r = w.warp * warp::kWarpSize + lane;
          const int64_t row = start + r;
          bool valid = row < p.k_len;
          if (valid && p.key_padding != nullptr) valid = !warp::load_global(w, p.key_padding + b * p.k_len + row);
          warp::store_shared<uint8_t>(w, base + L::kValid + r, valid ? 1 : 0);
        });
      }
    }
    warp::cp_async_commit(w);
  }

  LINATTN_HD bool key_valid(const WarpContext& w, uint32_t base, int key) const {
    return warp::load_shared<uint8_t>(w, base + L::kValid + key) != 0;
  }

  // --- fragments -------------------------------------------------------------------------------

  // φ(Q) rows 16·rb.. of the chunk, 16 feature columns from ks·16: an A operand.
  LINATTN_HD void query_fragment(const WarpContext& w, uint32_t base, int rb, int ks, Fragment (&a)[4]) const {
    Lanes<uint32_t> offset;
    warp::for_lanes(w, [&](int lane) {
      offset[lane] = base + L::kQ + (rb * 16 + lane % 16) * L::kQKPitch + (ks * 16 + lane / 16 * 8) * 2;
    });
    warp::ldmatrix_x4<false>(w, a, offset);
    warp::for_lanes(w, [&](int lane) {
      const int t = warp::thread_in_group(lane);
      LINATTN_UNROLL
      for (int i = 0; i < 4; ++i) {
        const int64_t col = ks * 16 + 2 * t + 8 * (i / 2);
        a[i][lane] = feature_pair<scalar_t>(p.feature_map, a[i][lane], col < p.feature_dim, col + 1 < p.feature_dim);
      }
    });
  }

  // φ(K)ᵀ for the scores: keys nt·8.. (columns) × features ks·16.. (rows), a B operand.
  LINATTN_HD void key_fragment(const WarpContext& w, uint32_t base, int nt, int ks, Fragment (&bf)[2]) const {
    Lanes<uint32_t> offset;
    warp::for_lanes(w, [&](int lane) {
      offset[lane] = base + L::kK + (nt * 8 + lane % 8) * L::kQKPitch + (ks * 16 + (lane / 8) % 2 * 8) * 2;
    });
    warp::ldmatrix_x2<false>(w, bf, offset);
    warp::for_lanes(w, [&](int lane) {
      const int g = warp::group_of(lane), t = warp::thread_in_group(lane);
      const bool valid = key_valid(w, base, nt * 8 + g);
      LINATTN_UNROLL
      for (int i = 0; i < 2; ++i) {
        const int64_t col = ks * 16 + 2 * t + 8 * i;
        bf[i][lane] = feature_pair<scalar_t>(p.feature_map, bf[i][lane], valid && col < p.feature_dim,
                                             valid && col + 1 < p.feature_dim);
      }
    });
  }

  // φ(K)ᵀ for the state update: features mi·16.. (rows) × keys kk·16.. (columns), an A operand.
  LINATTN_HD void key_transposed_fragment(const WarpContext& w, uint32_t base, int mi, int kk, Fragment (&a)[4]) const {
    Lanes<uint32_t> offset;
    warp::for_lanes(w, [&](int lane) {
      const int m = lane / 8;  // matrix m: keys +8 (m / 2), features +8 (m % 2)
      offset[lane] = base + L::kK + (kk * 16 + m / 2 * 8 + lane % 8) * L::kQKPitch + (mi * 16 + m % 2 * 8) * 2;
    });
    warp::ldmatrix_x4<true>(w, a, offset);
    warp::for_lanes(w, [&](int lane) {
      const int g = warp::group_of(lane), t = warp::thread_in_group(lane);
      LINATTN_UNROLL
      for (int i = 0; i < 4; ++i) {
        const int64_t feature = mi * 16 + g + 8 * (i % 2);
        const int key = kk * 16 + 2 * t + 8 * (i / 2);
        const bool inside = feature < p.feature_dim;
        a[i][lane] = feature_pair<scalar_t>(p.feature_map, a[i][lane], inside && key_valid(w, base, key),
                                            inside && key_valid(w, base, key + 1));
      }
    });
  }

  // [V | 1] for keys kk·16.. (rows) × 8 columns of tile ni (ni = DV / 8: the ones), a B operand.
  LINATTN_HD void value_fragment(const WarpContext& w, uint32_t base, int kk, int ni, Fragment (&bf)[2]) const {
    if (ni == DV / 8) {
      // The ones column: φ(k) is 0 for keys that must add nothing, so the ones need no mask.
      warp::for_lanes(w, [&](int lane) {
        const uint32_t one = warp::group_of(lane) == 0 ? warp::pack<scalar_t>(1.0f, 1.0f) : 0u;
        bf[0][lane] = one;
        bf[1][lane] = one;
      });
      return;
    }
    Lanes<uint32_t> offset;
    warp::for_lanes(w, [&](int lane) {
      offset[lane] = base + L::kV + (kk * 16 + (lane / 8) % 2 * 8 + lane % 8) * L::kVPitch + ni * 16;
    });
    warp::ldmatrix_x2<true>(w, bf, offset);
    if (p.key_padding != nullptr) {
      // A padded key's value may be anything (Inf, NaN): it must not meet the 0 score as 0·Inf.
      warp::for_lanes(w, [&](int lane) {
        const int t = warp::thread_in_group(lane);
        LINATTN_UNROLL
        for (int i = 0; i < 2; ++i) {
          const int key = kk * 16 + 2 * t + 8 * i;
          bf[i][lane] = keep_pair(bf[i][lane], key_valid(w, base, key), key_valid(w, base, key + 1));
        }
      });
    }
  }

  // The 16-bit state for features ks·16.. (rows) × 8 columns of tile ni, a B operand.
  LINATTN_HD void state_fragment(const WarpContext& w, int ks, int ni, Fragment (&bf)[2]) const {
    Lanes<uint32_t> offset;
    warp::for_lanes(w, [&](int lane) {
      offset[lane] = L::kState + (ks * 16 + (lane / 8) % 2 * 8 + lane % 8) * L::kStatePitch + ni * 16;
    });
    warp::ldmatrix_x2<true>(w, bf, offset);
  }

  // --- the state -------------------------------------------------------------------------------

  // Tile `slot` of warp w: its (row tile, column tile), or false past the last tile.
  LINATTN_HD static bool state_tile(int warp_index, int slot, int& mi, int& ni) {
    const int index = warp_index * State::kTilesPerWarp + slot;
    if (index >= State::kStateTiles) return false;
    mi = index / State::kStateCols;
    ni = index % State::kStateCols;
    return true;
  }

  // Element i of accumulator tile (mi, ni) for `lane`: its state row and column (the normalizer
  // tile's column 0 is the state's column dv, its other columns none: -1).
  LINATTN_HD int64_t state_row(int mi, int lane, int i) const { return mi * 16 + warp::group_of(lane) + 8 * (i / 2); }
  LINATTN_HD int64_t state_col(int ni, int lane, int i) const {
    const int c = 2 * warp::thread_in_group(lane) + i % 2;
    if (ni == DV / 8) return c == 0 ? p.value_dim : -1;
    return ni * 8 + c < p.value_dim ? ni * 8 + c : -1;
  }

  LINATTN_HD void load_state(const WarpContext& w, State& s) const {
    LINATTN_UNROLL
    for (int slot = 0; slot < State::kTilesPerWarp; ++slot) {
      int mi = 0, ni = 0;
      const bool mine = state_tile(w.warp, slot, mi, ni);
      warp::for_lanes(w, [&](int lane) {
        LINATTN_UNROLL
        for (int i = 0; i < 4; ++i) {
          const int64_t row = state_row(mi, lane, i), col = state_col(ni, lane, i);
          const bool stored = mine && p.state_in.data != nullptr && row < p.feature_dim && col >= 0;
          s.state[slot][i][lane] = stored ? warp::load_global(w, p.state_in.at(bh, row, col)) : 0.0f;
        }
      });
    }
  }

  LINATTN_HD void store_state(const WarpContext& w, const State& s) const {
    if (p.state_out.data == nullptr) return;
    LINATTN_UNROLL
    for (int slot = 0; slot < State::kTilesPerWarp; ++slot) {
      int mi = 0, ni = 0;
      if (!state_tile(w.warp, slot, mi, ni)) continue;
      warp::for_lanes(w, [&](int lane) {
        LINATTN_UNROLL
        for (int i = 0; i < 4; ++i) {
          const int64_t row = state_row(mi, lane, i), col = state_col(ni, lane, i);
          if (row < p.feature_dim && col >= 0) warp::store_global(w, p.state_out.at(bh, row, col), s.state[slot][i][lane]);
        }
      });
    }
  }

  // The 16-bit copy the queries read: each warp writes its tiles.
  LINATTN_HD void publish_state(const WarpContext& w, const State& s) const {
    LINATTN_UNROLL
    for (int slot = 0; slot < State::kTilesPerWarp; ++slot) {
      int mi = 0, ni = 0;
      if (!state_tile(w.warp, slot, mi, ni)) continue;
      warp::for_lanes(w, [&](int lane) {
        const int g = warp::group_of(lane), t = warp::thread_in_group(lane);
        LINATTN_UNROLL
        for (int half = 0; half < 2; ++half) {
          const uint32_t offset = L::kState + (mi * 16 + g + 8 * half) * L::kStatePitch + (ni * 8 + 2 * t) * 2;
          warp::store_shared<uint32_t>(
              w, offset, warp::pack<scalar_t>(s.state[slot][2 * half][lane], s.state[slot][2 * half + 1][lane]));
        }
      });
    }
  }

  // St += φ(K)ᵀ [V | 1] over the chunk's keys (`keys` of them hold data).
  LINATTN_HD void update_state(const WarpContext& w, State& s, uint32_t base, int keys) const {
    for (int kk = 0; kk * 16 < keys; ++kk) {
      int loaded = -1;
      Fragment a[4];
      LINATTN_UNROLL
      for (int slot = 0; slot < State::kTilesPerWarp; ++slot) {
        int mi = 0, ni = 0;
        if (!state_tile(w.warp, slot, mi, ni)) continue;
        if (mi != loaded) {  // a warp's tiles are contiguous: mostly one row tile
          key_transposed_fragment(w, base, mi, kk, a);
          loaded = mi;
        }
        Fragment bf[2];
        value_fragment(w, base, kk, ni, bf);
        warp::mma_16816<scalar_t>(s.state[slot], a, bf);
      }
    }
  }

  // --- the output ------------------------------------------------------------------------------

  // Value tile j (0 .. kOutTiles) of warp half `ch`: a state column tile.
  LINATTN_HD static int out_tile(int ch, int j) { return j < kColsPerHalf ? ch * kColsPerHalf + j : DV / 8; }

  // The chunk's output rows 16·rb.. for the warp's half of the value columns, and the normalizer.
  LINATTN_HD void output(const WarpContext& w, uint32_t base, int64_t chunk, bool causal) const {
    const int rb = w.warp % 4, ch = w.warp / 4;
    const int64_t row0 = chunk * kChunk + rb * 16;
    if (row0 >= p.q_len) return;
    // (Registers bound the order: one 16-column slice of φ(Q) at a time, loaded again for the
    // state product, and the scores packed to 16 bits before the output tiles are started.)
    Fragment scores[kChunk / 16][4];  // A fragments of the masked scores, 16 keys each
    if (causal) {
      // Scores against keys 0 .. 16·rb + 15 of the chunk (the later ones are masked whole).
      Accumulator sc[kChunk / 8][4];
      LINATTN_UNROLL
      for (int nt = 0; nt < kChunk / 8; ++nt) {
        LINATTN_UNROLL
        for (int i = 0; i < 4; ++i) warp::for_lanes(w, [&](int lane) { sc[nt][i][lane] = 0.0f; });
      }
      LINATTN_UNROLL
      for (int ks = 0; ks < DK / 16; ++ks) {
        Fragment qf[4];
        query_fragment(w, base, rb, ks, qf);
        LINATTN_UNROLL
        for (int nt = 0; nt < kChunk / 8; ++nt) {
          if (nt > 2 * rb + 1) continue;
          Fragment bf[2];
          key_fragment(w, base, nt, ks, bf);
          warp::mma_16816<scalar_t>(sc[nt], qf, bf);
        }
      }
      // The diagonal block: key j is seen by rows i >= j.
      warp::for_lanes(w, [&](int lane) {
        const int g = warp::group_of(lane), t = warp::thread_in_group(lane);
        LINATTN_UNROLL
        for (int nt = 0; nt < kChunk / 8; ++nt) {
          LINATTN_UNROLL
          for (int i = 0; i < 4; ++i) {
            const int row = rb * 16 + g + 8 * (i / 2), key = nt * 8 + 2 * t + i % 2;
            if (key > row) sc[nt][i][lane] = 0.0f;
          }
        }
      });
      // The C fragments of two score tiles are the A fragment of their 16 keys.
      warp::for_lanes(w, [&](int lane) {
        LINATTN_UNROLL
        for (int kk = 0; kk < kChunk / 16; ++kk) {
          LINATTN_UNROLL
          for (int i = 0; i < 4; ++i) {
            const Accumulator* tile = sc[2 * kk + i / 2];
            scores[kk][i][lane] = warp::pack<scalar_t>(tile[2 * (i % 2)][lane], tile[2 * (i % 2) + 1][lane]);
          }
        }
      });
    }
    Accumulator o[kOutTiles][4];
    LINATTN_UNROLL
    for (int j = 0; j < kOutTiles; ++j) {
      LINATTN_UNROLL
      for (int i = 0; i < 4; ++i) warp::for_lanes(w, [&](int lane) { o[j][i][lane] = 0.0f; });
    }
    // The chunks before: φ(Q) · St.
    LINATTN_UNROLL
    for (int ks = 0; ks < DK / 16; ++ks) {
      Fragment qf[4];
      query_fragment(w, base, rb, ks, qf);
      LINATTN_UNROLL
      for (int j = 0; j < kOutTiles; ++j) {
        Fragment bf[2];
        state_fragment(w, ks, out_tile(ch, j), bf);
        warp::mma_16816<scalar_t>(o[j], qf, bf);
      }
    }
    // This chunk: scores · [V | 1].
    if (causal) {
      LINATTN_UNROLL
      for (int kk = 0; kk < kChunk / 16; ++kk) {
        if (kk > rb) continue;
        LINATTN_UNROLL
        for (int j = 0; j < kOutTiles; ++j) {
          Fragment bf[2];
          value_fragment(w, base, kk, out_tile(ch, j), bf);
          warp::mma_16816<scalar_t>(o[j], scores[kk], bf);
        }
      }
    }
    // The normalizer of rows g and g + 8 is column 0 of the last tile, held by the group's lane 0.
    Lanes<int> leader;
    warp::for_lanes(w, [&](int lane) { leader[lane] = lane & ~3; });
    const Lanes<float> den_top = warp::shuffle(w, o[kOutTiles - 1][0], leader);
    const Lanes<float> den_bottom = warp::shuffle(w, o[kOutTiles - 1][2], leader);
    warp::for_lanes(w, [&](int lane) {
      const int g = warp::group_of(lane), t = warp::thread_in_group(lane);
      LINATTN_UNROLL
      for (int half = 0; half < 2; ++half) {
        const int64_t row = row0 + g + 8 * half;
        if (row >= p.q_len) continue;
        const float den = (half == 0 ? den_top[lane] : den_bottom[lane]) + p.eps;
        const int64_t out_row = (bh * p.q_len + row) * p.value_dim;
        LINATTN_UNROLL
        for (int j = 0; j < kColsPerHalf; ++j) {
          LINATTN_UNROLL
          for (int e = 0; e < 2; ++e) {
            const int64_t col = out_tile(ch, j) * 8 + 2 * t + e;
            if (col >= p.value_dim) continue;
            float value = o[j][2 * half + e][lane];
            if (p.normalize) value = fused::vanished(den) ? value * 0.0f : value / den;
            warp::store_global(w, p.out + out_row + col, scalar_t(value));
          }
        }
        if (ch == 0 && t == 0) warp::store_global(w, p.normalizer + bh * p.q_len + row, den);
      }
    });
  }
};

// The block program. `exec(phase)` runs phase(warp context, warp state) for every warp of the
// block, then waits for all of them (a barrier).
template <int DK, int DV, typename scalar_t, typename Exec>
LINATTN_HD void run_forward_block(const Exec& exec, const ForwardProblem<scalar_t>& p, int64_t block) {
  using Block = ForwardBlock<scalar_t, DK, DV>;
  using State = WarpState<DK, DV>;
  const Block blk(p, block);

  // Streams chunks 0 .. chunks - 1: `work(w, s, chunk, base, rows)` runs once each chunk's rows
  // are in shared memory, while the next chunk's are in flight. `republish`: the state changes
  // with every chunk, and its 16-bit copy is rewritten once every warp has read the old one.
  auto stream = [&](int64_t rows, bool want_q, bool want_kv, bool republish, auto&& work) {
    const int64_t chunks = (rows + kChunk - 1) / kChunk;
    if (chunks == 0) return;
    exec([&](const WarpContext& w, State&) { blk.issue_chunk(w, 0, want_q, want_kv); });
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      exec([&](const WarpContext& w, State& s) {
        if (republish && chunk > 0) blk.publish_state(w, s);
        warp::cp_async_wait<0>(w);
      });
      exec([&](const WarpContext& w, State& s) {
        if (chunk + 1 < chunks) blk.issue_chunk(w, chunk + 1, want_q, want_kv);
        const int64_t left = rows - chunk * kChunk;
        work(w, s, chunk, Block::buffer(chunk), static_cast<int>(left < kChunk ? left : kChunk));
      });
    }
  };

  exec([&](const WarpContext& w, State& s) {
    blk.load_state(w, s);
    blk.publish_state(w, s);
  });
  if (p.causal) {
    stream(p.q_len, true, true, true, [&](const WarpContext& w, State& s, int64_t chunk, uint32_t base, int rows) {
      blk.output(w, base, chunk, true);
      blk.update_state(w, s, base, rows);
    });
  } else {
    stream(p.k_len, false, true, false, [&](const WarpContext& w, State& s, int64_t, uint32_t base, int rows) {
      blk.update_state(w, s, base, rows);
    });
    exec([&](const WarpContext& w, State& s) { blk.publish_state(w, s); });
    stream(p.q_len, true, false, false, [&](const WarpContext& w, State&, int64_t chunk, uint32_t base, int) {
      blk.output(w, base, chunk, false);
    });
  }
  exec([&](const WarpContext& w, State& s) { blk.store_state(w, s); });
}

}  // namespace tensor_core
}  // namespace linattn
