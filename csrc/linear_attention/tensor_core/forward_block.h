// One block of the tensor-core forward (forward.h) as the operations its phases call: loading and
// preparing a chunk's rows, the mma operand fragments, the state tiles each warp owns, and a chunk's
// outputs. Written per warp on the warp-operation layer (common/warp/).
#pragma once

#include "problem.h"
#include "state_scale.h"
#include "../../common/warp/gated_pairs.h"
#include "../../common/warp/scan.h"

namespace linattn {
namespace tensor_core {

// The feature maps as the tensor-core kernels apply them (forward and backward alike, so that
// the backward recomputes the forward's φ bit for bit), each without a branch: elu+1 is x + 1 for
// x > 0 and e^x otherwise, by the device's fast exponential; NaN stays NaN in both.
LINATTN_HD inline float elu_plus_one(float x) {
  const float e = warp::exp_of(x);
  return x > 0.0f ? x + 1.0f : e;
}
LINATTN_HD inline float relu(float x) { return x < 0.0f ? 0.0f : x; }

// φ of a piece's 8 columns (four 16-bit pairs) in place, 0 from column `valid` on (columns past
// the head dim; valid = 0 for a row that must add nothing). The map is chosen once per piece, so
// a column costs a few instructions without a branch.
template <typename half_t>
LINATTN_HD inline void feature_piece(int map, int valid, warp::Words4& piece, float scale = 1.0f) {
  auto apply = [&](auto&& phi) {
    LINATTN_UNROLL
    for (int i = 0; i < 4; ++i) {
      // (φ of every column, then the selection: no branch around a column's φ.)
      const float lo = phi(warp::unpack_lo<half_t>(piece.word[i])) * scale;
      const float hi = phi(warp::unpack_hi<half_t>(piece.word[i])) * scale;
      piece.word[i] = warp::pack<half_t>(2 * i < valid ? lo : 0.0f, 2 * i + 1 < valid ? hi : 0.0f);
    }
  };
  if (map == kFeatureElu) {
    apply([](float x) { return elu_plus_one(x); });
  } else if (map == kFeatureRelu) {
    apply([](float x) { return relu(x); });
  } else {
    apply([](float x) { return x; });
  }
}

// Which operand rows a chunk buffer holds.
enum class Operand : int { kQuery = 0, kKey = 1, kValue = 2, kCotangent = 3 };

// o[j] += Σ score(row, key) · value(row, key, j, c) over the visible pairs of a 16×16 block of scores
// (an A fragment: 16 rows × 16 keys, as the mma reads it), for the lane's rows g, g + 8 and columns
// c = 2t, 2t + 1 of kTiles output tiles, adding nothing for a pair that is not visible: an mma
// would add 0 · Inf = NaN to a row whose masked key's row holds Inf or NaN, a row the reference
// never lets see it. Goes through the warp's fp32 scratch tile at `scratch` (16 × 16 × 4 bytes);
// kernels take it only for chunks whose rows hold Inf or NaN.
//
// The block is scores[block] (a loop rather than an index: registers cannot be indexed at run time).
template <typename scalar_t, int kBlocks, int kTiles, typename Visible, typename Value>
LINATTN_HD void add_visible_pairs(const WarpContext& w, uint32_t scratch, const Fragment (&scores)[kBlocks][4],
                                  int block, const Visible& visible, const Value& value,
                                  Accumulator (&o)[kTiles][4]) {
  LINATTN_UNROLL
  for (int kk = 0; kk < kBlocks; ++kk) {
    if (kk != block) continue;
    warp::for_lanes(w, [&](int lane) {
      const int g = warp::group_of(lane), t = warp::thread_in_group(lane);
      LINATTN_UNROLL
      for (int i = 0; i < 4; ++i) {
        const int row = g + 8 * (i % 2), key = 2 * t + 8 * (i / 2);
        warp::store_shared<float>(w, scratch + (row * 16 + key) * 4, warp::unpack_lo<scalar_t>(scores[kk][i][lane]));
        warp::store_shared<float>(w, scratch + (row * 16 + key + 1) * 4,
                                  warp::unpack_hi<scalar_t>(scores[kk][i][lane]));
      }
    });
  }
  warp::sync(w);
  warp::for_lanes(w, [&](int lane) {
    const int g = warp::group_of(lane), t = warp::thread_in_group(lane);
    LINATTN_UNROLL
    for (int j = 0; j < kTiles; ++j) {
      LINATTN_UNROLL
      for (int i = 0; i < 4; ++i) {
        const int row = g + 8 * (i / 2), c = 2 * t + i % 2;
        float sum = 0.0f;
        LINATTN_NO_UNROLL
        for (int key = 0; key < 16; ++key) {
          if (visible(row, key)) {
            sum += warp::load_shared<float>(w, scratch + (row * 16 + key) * 4) * value(row, key, j, c);
          }
        }
        o[j][i][lane] += sum;
      }
    }
  });
  warp::sync(w);
}

// Scores (fp32) of a chunk's query rows 16·rb .. 16·rb + 15 against its keys 0 .. 16·rb + 15 (the
// later keys are masked whole and left 0): Q and K rows at shared offsets q_origin and k_origin,
// `pitch` bytes a row, DK columns. The caller masks the diagonal block.
template <typename scalar_t, int DK>
LINATTN_HD void lower_scores(const WarpContext& w, uint32_t q_origin, uint32_t k_origin, int pitch, int rb,
                             Accumulator (&sc)[kChunk / 8][4]) {
  warp::clear(w, sc);
  LINATTN_UNROLL
  for (int ks = 0; ks < DK / 16; ++ks) {
    Fragment qf[4];
    warp::rows_as_a_operand(w, q_origin + rb * 16 * pitch + ks * 32, pitch, qf);
    LINATTN_UNROLL
    for (int nt = 0; nt < kChunk / 8; ++nt) {
      if (nt > 2 * rb + 1) continue;
      Fragment bf[2];
      warp::rows_as_b_operand_transposed(w, k_origin + nt * 8 * pitch + ks * 32, pitch, bf);
      warp::mma_16816<scalar_t>(sc[nt], qf, bf);
    }
  }
}

// A 16-bit element of shared memory as fp32.
template <typename scalar_t>
LINATTN_HD inline float shared_element(const WarpContext& w, uint32_t offset) {
  return static_cast<float>(scalar_t(warp::load_shared<uint16_t>(w, offset), typename scalar_t::from_bits_t()));
}

// --- gates per channel: the causal scores' diagonal blocks (the forward's and the backward's
// layouts name kQ, kK, kQKPitch, kGates, kGatePitch and kDiagonal) --------------------------------

// The pair weights Σ_c φ(q)_ic φ(k)_jc e^{G_ic − G_jc} of the chunk's diagonal 16 × 16 blocks, for
// key j <= row i of the same block (0 above the diagonal), to L::kDiagonal (row i's at i · 16):
// by every thread, once the chunk's rows are ready (warp/gated_pairs.h).
template <typename scalar_t, typename L>
LINATTN_HD void gated_diagonal_pairs(const WarpContext& w, uint32_t base, int64_t channels) {
  using Gates = warp::ChannelGates<L::kGates, L::kGatePitch>;
  warp::each_block_element<kThreads>(w, kChunk * 16, [&](int e) {
    const int row = e / 16, col = row / 16 * 16 + e % 16;
    const float x = col <= row ? warp::gated_pair_weight<scalar_t, L::kQKPitch>(w, Gates{}, static_cast<int>(channels),
                                                                                base + L::kQ, row, base + L::kK, col)
                               : 0.0f;
    warp::store_shared<float>(w, static_cast<uint32_t>(L::kDiagonal + e * 4), x);
  });
}

// Pair (row, key) of a diagonal block (key <= row, both chunk rows), as gated_diagonal_pairs left it.
template <typename L>
LINATTN_HD float diagonal_pair(const WarpContext& w, int row, int key) {
  return warp::load_shared<float>(w, static_cast<uint32_t>(L::kDiagonal + (row * 16 + key % 16) * 4));
}

// --- a fading state: the chunk's log factors (both the forward's and the backward's layouts name
// their fp32 rows kCumulativeDecay, kRowFade and kKeyFade) --------------------------------------

// The chunk's cumulative log factors b_r = a_0 + ... + a_r, e^{b_r} (what the earlier chunks'
// state is worth at row r) and e^{b_last − b_r} (what key r is worth at the chunk's end), by warp 0,
// from the chunk's rows `start` .. of a (batch, head)'s factors, its sequence ending at row `end`.
// Rows past the end have a = 0, so b_last is the last row's; no exponent is positive.
template <typename L>
LINATTN_HD void load_chunk_decay(const WarpContext& w, const float* log_decay, int64_t end, int64_t start,
                                 uint32_t base) {
  if (w.warp != 0) return;
  Lanes<float> b[2];
  warp::for_lanes(w, [&](int lane) {
    LINATTN_UNROLL
    for (int half = 0; half < 2; ++half) {
      const int64_t row = start + lane + 32 * half;
      b[half][lane] = row < end ? warp::load_global(w, log_decay + row) : 0.0f;
    }
  });
  const Lanes<float> total = warp::inclusive_scan_64(w, b);
  warp::for_lanes(w, [&](int lane) {
    LINATTN_UNROLL
    for (int half = 0; half < 2; ++half) {
      const uint32_t at = static_cast<uint32_t>((lane + 32 * half) * 4);
      warp::store_shared<float>(w, base + L::kCumulativeDecay + at, b[half][lane]);
      warp::store_shared<float>(w, base + L::kRowFade + at, warp::exp_of(b[half][lane]));
      warp::store_shared<float>(w, base + L::kKeyFade + at, warp::exp_of(total[lane] - b[half][lane]));
    }
  });
}

// Row r of a chunk's fp32 row array (b, e^b or e^{b_last − b}).
LINATTN_HD inline float decay_row(const WarpContext& w, uint32_t array, int r) {
  return warp::load_shared<float>(w, array + static_cast<uint32_t>(r * 4));
}

// The factors of chunk rows kk·16 .. kk·16 + 15 where an mma's k index runs over them, as the lane
// holds them: f[i] is row kk·16 + 8 (i / 2) + 2t + i % 2 — a B operand's rows (b[r]: f[2r],
// f[2r + 1]) and an A operand's columns (a[i]: f[2 (i / 2)], f[2 (i / 2) + 1]) alike.
LINATTN_HD inline void k_row_factors(const WarpContext& w, uint32_t array, int kk, Lanes<float> (&f)[4]) {
  warp::for_lanes(w, [&](int lane) {
    // (warp::opaque: the rows are computed where they are read, not kept across a kernel's loop.)
    const int t = warp::thread_in_group(warp::opaque(lane));
    LINATTN_UNROLL
    for (int i = 0; i < 4; ++i) f[i][lane] = decay_row(w, array, kk * 16 + 8 * (i / 2) + 2 * t + i % 2);
  });
}

// The pair x ⊙ (f_lo, f_hi), rounded to 16 bits.
template <typename half_t>
LINATTN_HD inline uint32_t scaled_pair(uint32_t pair, float f_lo, float f_hi) {
  return warp::pack<half_t>(warp::unpack_lo<half_t>(pair) * f_lo, warp::unpack_hi<half_t>(pair) * f_hi);
}

// x ⊙ (f_lo, f_hi) in two parts: the pair becomes the product rounded to 16 bits (hi) and the
// rounded rest (lo) is returned, so that hi + lo carries the product to fp32's precision.
template <typename half_t>
LINATTN_HD inline uint32_t split_scaled_pair(uint32_t& pair, float f_lo, float f_hi) {
  const float x0 = warp::unpack_lo<half_t>(pair) * f_lo, x1 = warp::unpack_hi<half_t>(pair) * f_hi;
  pair = warp::pack<half_t>(x0, x1);
  return warp::pack<half_t>(x0 - warp::unpack_lo<half_t>(pair), x1 - warp::unpack_hi<half_t>(pair));
}

// A B operand (16 k rows × 8 columns) with k row r weighted by its factor (k_row_factors).
template <typename half_t>
LINATTN_HD void scale_b_rows(const WarpContext& w, const Lanes<float> (&f)[4], Fragment (&bf)[2]) {
  warp::for_lanes(w, [&](int lane) {
    LINATTN_UNROLL
    for (int r = 0; r < 2; ++r) bf[r][lane] = scaled_pair<half_t>(bf[r][lane], f[2 * r][lane], f[2 * r + 1][lane]);
  });
}

// An A operand (16 rows × 16 k columns) with k column c weighted by its factor (k_row_factors), as
// hi (in place) + lo (split_scaled_pair).
template <typename half_t>
LINATTN_HD void split_scaled_a_columns(const WarpContext& w, const Lanes<float> (&f)[4], Fragment (&a)[4],
                                       Fragment (&lo)[4]) {
  warp::for_lanes(w, [&](int lane) {
    LINATTN_UNROLL
    for (int i = 0; i < 4; ++i) {
      lo[i][lane] = split_scaled_pair<half_t>(a[i][lane], f[2 * (i / 2)][lane], f[2 * (i / 2) + 1][lane]);
    }
  });
}

// kFading: a fading state (decay, gates), compiled apart so that the plain kernel carries none
// of its branches. kChannels (with kFading): gates per feature channel (GLA; "gates per channel"
// below says what changes).
template <typename scalar_t, int DK, int DV, bool kFading, bool kChannels = false>
struct ForwardBlock : SequenceRows {
  static_assert(kFading || !kChannels, "gates per channel are a fading state");
  using L = Layout<DK, DV, kChannels>;
  using State = WarpState<DK, DV>;
  static constexpr int kColsPerHalf = DV / 16;  // value n8 tiles per output warp
  static constexpr int kOutTiles = kColsPerHalf + 1;  // plus the normalizer tile
  using Scales = StateScales<scalar_t, L::kStateScales>;  // float16: the copy is St / σ

  const ForwardProblem<scalar_t>& p;
  // Block index = ((nh · segments) + segment) · value_tiles + tile, nh = (batch or packed
  // sequence) · heads + head; states are per (nh, segment). Where its rows lie (bh, b, h, first,
  // q_end, k_end) is the SequenceRows it derives from.
  int64_t tile, state_index, segment, col0;
  Strided4<const scalar_t> v_tile;  // v from the tile's first column

  LINATTN_HD ForwardBlock(const ForwardProblem<scalar_t>& problem, int64_t index)
      : SequenceRows(sequence_rows(problem.packing, index / problem.value_tiles / problem.segments, problem.heads,
                                   problem.q_len, problem.k_len)),
        p(problem),
        tile(index % problem.value_tiles),
        state_index(index / problem.value_tiles),
        segment(state_index % problem.segments),
        col0(tile * DV),
        v_tile(problem.v) {
    v_tile.data += col0 * problem.v.stride[3];
  }

  // The chunk buffer of the block's chunk number `chunk` (counted from its first row).
  LINATTN_HD static uint32_t buffer(int64_t chunk) { return static_cast<uint32_t>((chunk & 1) * L::kBuffer); }

  // The block's query rows [begin, end) (all of its sequence's unless the sequence is split).
  LINATTN_HD void query_rows(int64_t& begin, int64_t& end) const {
    segment_row_range(p.segments, segment, first, q_end, p.segment_rows_q, begin, end);
  }
  LINATTN_HD void key_rows(int64_t& begin, int64_t& end) const {
    segment_row_range(p.segments, segment, first, k_end, p.segment_rows_k, begin, end);
  }

  // --- loads ---------------------------------------------------------------------------------
  // A chunk's rows arrive in 16-byte pieces; piece e of an operand (row e / pieces per row,
  // columns 8 (e % pieces per row) ..) is copied and then prepared by thread e mod 256, so that
  // each thread prepares what it copied itself, once its own copies have landed, and one barrier
  // later every warp reads finished rows.

  LINATTN_HD warp::RowTile<scalar_t> rows_of(Operand operand) const {
    // (Rows end with the block's sequence: a packed sequence's neighbour adds nothing.)
    if (operand == Operand::kQuery) return {&p.q, p.q_vector, q_end, p.feature_dim, DK, L::kQKPitch, L::kQ};
    if (operand == Operand::kKey) return {&p.k, p.k_vector, k_end, p.feature_dim, DK, L::kQKPitch, L::kK};
    return {&v_tile, p.v_vector, k_end, p.value_dim - col0, DV, L::kVPitch, L::kV};
  }

  LINATTN_HD void load_rows(const WarpContext& w, Operand operand, uint32_t base, int64_t start) const {
    warp::copy_rows<kThreads, kChunk>(w, rows_of(operand), b, h, base, start);
  }

  // Rows as the products want them: φ(q), φ(k) and v, with 0 for columns past the head dim (φ(0)
  // need not be 0) and, for keys, 0 in a padded key's or a past-the-end key's row, so those add
  // nothing (and a padded key's Inf or NaN never meets a 0 score). A value row holding Inf or NaN
  // raises the chunk's flag (see diagonal_exactly).
  LINATTN_HD void prepare_rows(const WarpContext& w, Operand operand, uint32_t base, int64_t start) const {
    const warp::RowTile<scalar_t> x = rows_of(operand);
    warp::each_piece<kThreads, kChunk>(w, x, [&](int r, int col) {
      const int64_t row = start + r;
      bool valid = row < x.rows;
      if (valid && operand != Operand::kQuery && p.key_padding != nullptr)
        valid = !warp::load_global(w, p.key_padding + b * p.k_len + row);
      const uint32_t at = base + x.offset + static_cast<uint32_t>(r * x.pitch + col * 2);
      warp::Words4 piece = warp::load_shared<warp::Words4>(w, at);
      if (operand == Operand::kValue) {
        bool finite = true;
        LINATTN_UNROLL
        for (int i = 0; i < 4; ++i) {
          piece.word[i] = valid ? piece.word[i] : 0u;
          finite = finite && warp::finite_pair<scalar_t>(piece.word[i]);
        }
        if (!finite) warp::store_shared<uint8_t>(w, base + L::kNonFinite, 1);
      } else {
        const int64_t left = x.dim - col;
        feature_piece<scalar_t>(p.feature_map, !valid ? 0 : left < 8 ? static_cast<int>(left) : 8, piece);
      }
      warp::store_shared<warp::Words4>(w, at, piece);
    });
  }

  // Issues the loads of chunk `chunk`: Q rows and/or K and V rows.
  LINATTN_HD void issue_chunk(const WarpContext& w, int64_t chunk, int64_t start, bool want_q, bool want_kv) const {
    const uint32_t base = buffer(chunk);
    if (want_q) load_rows(w, Operand::kQuery, base, start);
    if (want_kv) {
      load_rows(w, Operand::kKey, base, start);
      load_rows(w, Operand::kValue, base, start);
      if (w.warp == 0) warp::for_lanes(w, [&](int lane) {
        if (lane == 0) warp::store_shared<uint8_t>(w, base + L::kNonFinite, 0);
      });
    }
    warp::cp_async_commit(w);
  }

  // Once the chunk's copies issued by this warp have landed: prepares what it copied.
  LINATTN_HD void prepare_chunk(const WarpContext& w, int64_t chunk, int64_t start, bool want_q, bool want_kv) const {
    warp::cp_async_wait<0>(w);
    const uint32_t base = buffer(chunk);
    if (want_q) prepare_rows(w, Operand::kQuery, base, start);
    if (want_kv) {
      prepare_rows(w, Operand::kKey, base, start);
      prepare_rows(w, Operand::kValue, base, start);
      if constexpr (kFading) load_decay(w, base, start);
    }
  }

  // --- a fading state (causal: rows and keys are the same positions) ---------------------------

  LINATTN_HD static constexpr bool fading() { return kFading; }

  LINATTN_HD void load_decay(const WarpContext& w, uint32_t base, int64_t start) const {
    if constexpr (kChannels) {
      const int64_t left = k_end - start;
      warp::load_cumulative_gates<kChunk, DK>(w, gates(), p.log_decay + (bh * p.k_len + start) * p.feature_dim,
                                              p.feature_dim, static_cast<int>(left < kChunk ? left : kChunk),
                                              p.feature_dim, [](int, float g) { return g; });
    } else {
      load_chunk_decay<L>(w, p.log_decay + bh * p.k_len, k_end, start, base);
    }
  }

  // --- gates per channel (kChannels) ------------------------------------------------------------
  // Row c of the state fades at its own rate, so the chunk's cumulative log factors are a matrix,
  // G_rc = a_0c + … + a_rc (fp32 in shared memory, L::kGates), and each factor the per-token
  // instance applies to a product's rows moves inside the product as an operand's elementwise
  // factor (warp/operand_factors.h): φ(Q) ⊙ e^G for φ(Q) St, φ(K) ⊙ e^{G_last − G} for the state's
  // update, the state's row c faded by e^{G_last,c}; the causal scores' pair weights
  // Σ_c φ(q)_ic φ(k)_jc e^{G_ic − G_jc} on tensor cores between 16-row blocks, in fp32 within them
  // (diagonal_pairs; both through warp/gated_pairs.h). Where the log factors are <= 0 no factor
  // exceeds 1: no 16-bit operand overflows.

  using Gates = warp::ChannelGates<L::kGates, L::kGatePitch>;
  LINATTN_HD static constexpr Gates gates() { return {}; }
  LINATTN_HD static float gate_sum(const WarpContext& w, int r, int c) { return Gates::at(w, r, c); }

  LINATTN_HD void diagonal_pairs(const WarpContext& w, uint32_t base) const {
    gated_diagonal_pairs<scalar_t, L>(w, base, p.feature_dim);
  }

  // --- fragments (of prepared rows) ------------------------------------------------------------

  // φ(Q) rows 16·rb.. of the chunk, 16 feature columns from ks·16: an A operand.
  LINATTN_HD void query_fragment(const WarpContext& w, uint32_t base, int rb, int ks, Fragment (&a)[4]) const {
    warp::rows_as_a_operand(w, base + L::kQ + rb * 16 * L::kQKPitch + ks * 32, L::kQKPitch, a);
  }

  // φ(K)ᵀ for the scores: keys nt·8.. (columns) × features ks·16.. (rows), a B operand.
  LINATTN_HD void key_fragment(const WarpContext& w, uint32_t base, int nt, int ks, Fragment (&bf)[2]) const {
    warp::rows_as_b_operand_transposed(w, base + L::kK + nt * 8 * L::kQKPitch + ks * 32, L::kQKPitch, bf);
  }

  // φ(K)ᵀ for the state update: features mi·16.. (rows) × keys kk·16.. (columns), an A operand.
  LINATTN_HD void key_transposed_fragment(const WarpContext& w, uint32_t base, int mi, int kk, Fragment (&a)[4]) const {
    warp::rows_as_a_operand_transposed(w, base + L::kK + kk * 16 * L::kQKPitch + mi * 32, L::kQKPitch, a);
  }

  // [V | 1] for keys kk·16.. (rows) × 8 columns of tile ni (ni = DV / 8: the ones), a B operand.
  LINATTN_HD void value_fragment(const WarpContext& w, uint32_t base, int kk, int ni, Fragment (&bf)[2]) const {
    if (ni == DV / 8) {
      // The ones column: φ(k) is 0 in the rows of keys that must add nothing, so the ones need no mask.
      warp::for_lanes(w, [&](int lane) {
        const uint32_t one = warp::group_of(lane) == 0 ? warp::pack<scalar_t>(1.0f, 1.0f) : 0u;
        bf[0][lane] = one;
        bf[1][lane] = one;
      });
      return;
    }
    warp::rows_as_b_operand(w, base + L::kV + kk * 16 * L::kVPitch + ni * 16, L::kVPitch, bf);
  }

  // The 16-bit state for features ks·16.. (rows) × 8 columns of tile ni, a B operand.
  LINATTN_HD void state_fragment(const WarpContext& w, int ks, int ni, Fragment (&bf)[2]) const {
    warp::rows_as_b_operand(w, L::kState + ks * 16 * L::kStatePitch + ni * 16, L::kStatePitch, bf);
  }

  // --- the state -------------------------------------------------------------------------------

  LINATTN_HD int64_t state_col(int col) const { return augmented_state_column(col, DV, col0, p.value_dim); }

  LINATTN_HD void load_state(const WarpContext& w, State& s) const {
    s.each_element(w, [&](bool mine, int row, int c, float& x) {
      const int64_t col = state_col(c);
      const bool stored = mine && p.state_in.data != nullptr && row < p.feature_dim && col >= 0;
      x = stored ? warp::load_global(w, p.state_in.at(state_index, row, col)) : 0.0f;
    });
  }

  LINATTN_HD void store_state(const WarpContext& w, State& s) const {
    if (p.state_out.data == nullptr) return;
    s.each_element(w, [&](bool mine, int row, int c, float& x) {
      const int64_t col = state_col(c);
      const bool written = mine && col >= 0 && (col < p.value_dim || tile == 0);  // z: tile 0's
      if (row < p.feature_dim && written) warp::store_global(w, p.state_out.at(state_index, row, col), x);
    });
  }

  // The 16-bit copy the queries read: each warp writes its tiles (float16: St / σ, once every
  // warp recorded its size since the state last changed; state_scale.h).
  LINATTN_HD void publish_state(const WarpContext& w, const State& s) const {
    s.template publish<scalar_t>(w, L::kState, L::kStatePitch, 0, Scales::publish_scale(w));
  }

  // St += φ(K)ᵀ [V | 1] over the chunk's keys; with a fading state
  // St = e^{b_last} St + φ(K)ᵀ (e^{b_last − b} ⊙ [V | 1]). Every key block of the chunk, whole:
  // rows past the sequence's end are zeros in shared memory (copy_rows, prepare_rows) and add
  // nothing, so the loop has no run-time bound and no branch between its products. A row tile's
  // B fragments are all loaded before its products, so that their loads overlap.
  LINATTN_HD void update_state(const WarpContext& w, State& s, uint32_t base) const {
    if constexpr (kChannels) {  // row c by e^{G_last,c}
      s.each_element(w, [&](bool, int row, int, float& x) { x *= warp::exp_of(gate_sum(w, kChunk - 1, row)); });
    } else if constexpr (kFading) {
      const float chunk_fade = decay_row(w, base + L::kRowFade, kChunk - 1);
      s.each_element(w, [&](bool, int, int, float& x) { x *= chunk_fade; });
    }
    const int warp_index = warp::uniform(w.warp);
    LINATTN_UNROLL
    for (int kk = 0; kk < kChunk / 16; ++kk) {
      Lanes<float> fades[4];
      if constexpr (kFading && !kChannels) k_row_factors(w, base + L::kKeyFade, kk, fades);
      LINATTN_UNROLL
      for (int r = 0; r < State::kRowTilesPerWarp; ++r) {
        int mi = 0, ni = 0;
        State::tile(warp_index, r * State::kColsPerWarp, mi, ni);
        Fragment a[4];
        key_transposed_fragment(w, base, mi, kk, a);
        if constexpr (kChannels) {  // feature mi·16 + r of key kk·16 + c by e^{G_last − G_key}
          warp::scale_a_operand<scalar_t>(w, a, [&](int r, int c) {
            return warp::exp_of(gate_sum(w, kChunk - 1, mi * 16 + r) - gate_sum(w, kk * 16 + c, mi * 16 + r));
          });
        }
        Fragment bf[State::kColsPerWarp][2];
        LINATTN_UNROLL
        for (int c = 0; c < State::kColsPerWarp; ++c) {
          if (!State::tile(warp_index, r * State::kColsPerWarp + c, mi, ni)) continue;
          value_fragment(w, base, kk, ni, bf[c]);
          if constexpr (kFading && !kChannels) scale_b_rows<scalar_t>(w, fades, bf[c]);
        }
        LINATTN_UNROLL
        for (int c = 0; c < State::kColsPerWarp; ++c) {
          const int slot = r * State::kColsPerWarp + c;
          if (State::tile(warp_index, slot, mi, ni)) warp::mma_16816<scalar_t>(s.state[slot], a, bf[c]);
        }
      }
    }
  }

  // --- the output ------------------------------------------------------------------------------

  // The output work of warp w: query rows 16·rb.. of the chunk (rb = row_block) and half `ch` of
  // the value columns (value_half). Row block rb sees rb + 1 key blocks, so the warps sharing a
  // scheduler (w and w + 4: warps are spread over an SM's four schedulers by w mod 4) take row
  // blocks rb and 3 − rb: every scheduler then has the same work per chunk.
  LINATTN_HD static int value_half(int warp_index) { return warp_index / 4; }
  LINATTN_HD static int row_block(int warp_index) {
    return value_half(warp_index) == 0 ? warp_index % 4 : 3 - warp_index % 4;
  }

  // Value tile j (0 .. kOutTiles) of warp half `ch`: a state column tile.
  LINATTN_HD static int out_tile(int ch, int j) { return j < kColsPerHalf ? ch * kColsPerHalf + j : DV / 8; }

  // The diagonal block's scores · [V | 1] over visible pairs only (add_visible_pairs): for chunks
  // whose V holds Inf or NaN.
  LINATTN_HD void diagonal_exactly(const WarpContext& w, uint32_t base, const Fragment (&scores)[kChunk / 16][4],
                                   Accumulator (&o)[kOutTiles][4]) const {
    const int warp_index = warp::uniform(w.warp), rb = row_block(warp_index), ch = value_half(warp_index);
    const uint32_t values = base + L::kV + rb * 16 * L::kVPitch;
    add_visible_pairs<scalar_t>(
        w, L::kScratch + w.warp * 16 * 16 * 4, scores, rb, [](int row, int key) { return key <= row; },
        [&](int, int key, int j, int c) {
          const int col = out_tile(ch, j) * 8 + c;
          if (j == kOutTiles - 1) return col == DV ? 1.0f : 0.0f;  // the ones column
          return shared_element<scalar_t>(w, values + key * L::kVPitch + col * 2);
        },
        o);
  }

  // The chunk's output rows 16·rb.. for the warp's half of the value columns, and the normalizer.
  LINATTN_HD void output(const WarpContext& w, uint32_t base, int64_t start, bool causal) const {
    const int warp_index = warp::uniform(w.warp), rb = row_block(warp_index), ch = value_half(warp_index);
    const int64_t row0 = start + rb * 16;
    if (row0 >= q_end) return;
    // (Registers bound the order: one 16-column slice of φ(Q) at a time, loaded again for the
    // state product, and the scores packed to 16 bits before the output tiles are started.)
    Fragment scores[kChunk / 16][4];  // A fragments of the masked scores, 16 keys each
    if (causal) {
      Accumulator sc[kChunk / 8][4];
      if constexpr (kChannels) {
        warp::clear(w, sc);
        LINATTN_UNROLL
        for (int kk = 0; kk < kChunk / 16; ++kk) {
          if (kk < rb) {
            warp::gated_pair_block<scalar_t, DK, L::kQKPitch>(w, gates(), sc, 2 * kk, base + L::kQ, rb, base + L::kK,
                                                              kk);
          }
        }
      } else {
        lower_scores<scalar_t, DK>(w, base + L::kQ, base + L::kK, L::kQKPitch, rb, sc);
      }
      // The diagonal block: key j is seen by rows i >= j; a fading state weights the pair by
      // e^{b_i − b_j} <= 1, in fp32 before the scores are rounded to 16 bits (gates per channel:
      // diagonal_pairs' sums).
      warp::each_accumulator(w, sc, [&](int r, int key, float& x) {
        const int row = rb * 16 + r;
        if (key > row) {
          x = 0.0f;
        } else if constexpr (kChannels) {
          if (key >= rb * 16) x = diagonal_pair<L>(w, row, key);
        } else if constexpr (kFading) {
          const uint32_t b = base + L::kCumulativeDecay;
          x *= warp::exp_of(decay_row(w, b, row) - decay_row(w, b, key));
        }
      });
      warp::as_a_fragments<scalar_t>(w, sc, scores);
    }
    Accumulator o[kOutTiles][4];
    warp::clear(w, o);
    // The chunks before: φ(Q) · St.
    LINATTN_UNROLL
    for (int ks = 0; ks < DK / 16; ++ks) {
      Fragment qf[4];
      query_fragment(w, base, rb, ks, qf);
      if constexpr (kChannels) {  // φ(q_i) ⊙ e^{G_i}
        warp::scale_a_operand<scalar_t>(w, qf, [&](int r, int c) {
          return warp::exp_of(gate_sum(w, rb * 16 + r, ks * 16 + c));
        });
      }
      LINATTN_UNROLL
      for (int j = 0; j < kOutTiles; ++j) {
        Fragment bf[2];
        state_fragment(w, ks, out_tile(ch, j), bf);
        warp::mma_16816<scalar_t>(o[j], qf, bf);
      }
    }
    if constexpr ((kFading && !kChannels) || Scales::kScaled) {
      // The earlier chunks' state is worth e^{b_i} at row i (a fading state), and float16's copy
      // of it is St / σ.
      const float sigma = Scales::of(w);
      warp::for_lanes(w, [&](int lane) {
        const int g = warp::group_of(lane);
        LINATTN_UNROLL
        for (int half = 0; half < 2; ++half) {
          float fade = sigma;
          if constexpr (kFading && !kChannels) fade *= decay_row(w, base + L::kRowFade, rb * 16 + g + 8 * half);
          LINATTN_UNROLL
          for (int j = 0; j < kOutTiles; ++j) {
            o[j][2 * half][lane] *= fade;
            o[j][2 * half + 1][lane] *= fade;
          }
        }
      });
    }
    // This chunk: scores · [V | 1].
    if (causal) {
      const bool exact_diagonal = warp::load_shared<uint8_t>(w, base + L::kNonFinite) != 0;
      LINATTN_UNROLL
      for (int kk = 0; kk < kChunk / 16; ++kk) {
        if (kk > rb || (kk == rb && exact_diagonal)) continue;
        LINATTN_UNROLL
        for (int j = 0; j < kOutTiles; ++j) {
          Fragment bf[2];
          value_fragment(w, base, kk, out_tile(ch, j), bf);
          warp::mma_16816<scalar_t>(o[j], scores[kk], bf);
        }
      }
      if (exact_diagonal) diagonal_exactly(w, base, scores, o);
    }
    // The normalizer of rows g and g + 8 is column 0 of the last tile, held by the group's lane 0.
    Lanes<int> leader;
    warp::for_lanes(w, [&](int lane) { leader[lane] = lane & ~3; });
    const Lanes<float> den_top = warp::shuffle(w, o[kOutTiles - 1][0], leader);
    const Lanes<float> den_bottom = warp::shuffle(w, o[kOutTiles - 1][2], leader);
    // Rows are divided by their normalizer as a multiplication by its reciprocal, once per row;
    // a tile of whole 8-column blocks at even offsets stores its pairs of columns 4 bytes at once.
    const bool paired = p.value_dim % 2 == 0 && col0 + DV <= p.value_dim;
    warp::for_lanes(w, [&](int lane) {
      const int g = warp::group_of(lane), t = warp::thread_in_group(lane);
      LINATTN_UNROLL
      for (int half = 0; half < 2; ++half) {
        const int64_t row = row0 + g + 8 * half;
        if (row >= q_end) continue;
        const float den = (half == 0 ? den_top[lane] : den_bottom[lane]) + p.eps;
        // (A vanished normalizer makes the row 0, or NaN where the numerator is not finite.)
        const float scale = p.normalize ? fused::inverse_unless_vanished(den) : 1.0f;
        scalar_t* const out_row = p.out + (bh * p.q_len + row) * p.value_dim;
        LINATTN_UNROLL
        for (int j = 0; j < kColsPerHalf; ++j) {
          const int64_t col = col0 + out_tile(ch, j) * 8 + 2 * t;
          warp::store_column_pair(w, out_row, col, p.value_dim, paired, o[j][2 * half][lane] * scale,
                                  o[j][2 * half + 1][lane] * scale);
        }
        if (tile == 0 && ch == 0 && t == 0) warp::store_global(w, p.normalizer + bh * p.q_len + row, den);
      }
    });
  }
};

}  // namespace tensor_core
}  // namespace linattn
