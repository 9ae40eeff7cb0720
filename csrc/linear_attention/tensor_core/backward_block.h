// One block of the tensor-core backward (backward.h) as the operations its phases call: loading
// and preparing a chunk's rows (φ(q), φ(k), v and the augmented cotangent G'), the state tiles,
// and a chunk's gradient rows. Written per warp on the warp-operation layer (common/warp/).
//
// Notation (docs/guide/cuda.md, "The tensor-core backward"): per chunk of 64 rows, warp w takes the
// 16 rows rb = w % 4 of the chunk and half (ch = w / 4) of the output columns. G = G'[:, :dv] and
// gn = G'[:, dv] (the normalizer's cotangent); U = [U_v | u], S = [S_v | z]. A fading state (causal)
// weights pairs as the forward does: e^{b_i − b_j} inside a chunk, e^{b_i} on the earlier chunks'
// state, e^{b_last − b_j} on what key j adds to it (b = the chunk's cumulative log factors).
#pragma once

#include "backward_problem.h"
#include "forward_block.h"
#include "state_scale.h"

#include <type_traits>

namespace linattn {
namespace tensor_core {

// φ'(x) from φ(x): elu+1 is x + 1 > 1 for x > 0 (φ' = 1) and eˣ = φ' otherwise; relu's is 1 where
// φ > 0. NaN stays NaN for elu+1 and gives 0 for relu, as fused::feature_derivative.
LINATTN_HD inline float derivative_from_feature(int map, float phi) {
  const float elu = phi > 1.0f ? 1.0f : phi, relu = phi > 0.0f ? 1.0f : 0.0f;  // (selections, no branch)
  return map == kFeatureElu ? elu : map == kFeatureRelu ? relu : 1.0f;
}

// kFading: the instance for a fading state (log_decay set), compiled apart so that its registers
// do not weigh on the plain kernels. kChannels (with kFading): gates per channel (GLA; "gates per
// channel" below says what changes).
template <typename scalar_t, int DK, int DV, bool kFading = false, bool kChannels = false>
struct BackwardBlock : SequenceRows {
  static_assert(kFading || !kChannels, "gates per channel are a fading state");
  static constexpr bool kPerChannel = kChannels;
  // float16 (range 65504) holds a normalized row's G' / σ (BackwardProblem, row_scalars_of).
  static constexpr bool kRowScaled = std::is_same_v<scalar_t, c10::Half>;
  using L = BackwardLayout<DK, DV, kChannels>;
  // ... and its state copies as state / σ (state_scale.h).
  using Scales = StateScales<scalar_t, L::kStateScales>;
  static constexpr int kValueTiles = DV / 16;    // n8 tiles of a warp's half of the value columns
  static constexpr int kFeatureTiles = DK / 16;  // ... of the feature columns
  static constexpr int kKeyBlocks = kChunk / 16;

  const BackwardProblem<scalar_t>& p;
  // Block index = nh · segments + segment, nh = (batch or packed sequence) · heads + head; states
  // are per block. Where its rows lie (bh, b, h, first, q_end, k_end) is the SequenceRows it
  // derives from.
  int64_t state_index, segment;
  Strided4<const scalar_t> cotangent;  // grad_out, which the G' rows are built from

  LINATTN_HD BackwardBlock(const BackwardProblem<scalar_t>& problem, int64_t index)
      : SequenceRows(sequence_rows(problem.packing, index / problem.segments, problem.heads, problem.q_len,
                                   problem.k_len)),
        p(problem),
        state_index(index),
        segment(index % problem.segments),
        cotangent(problem.grad_out) {}

  // The block's query and key rows [begin, end) (all of its sequence's unless it is split).
  LINATTN_HD void query_rows(int64_t& begin, int64_t& end) const {
    segment_row_range(p.segments, segment, first, q_end, p.segment_rows_q, begin, end);
  }
  LINATTN_HD void key_rows(int64_t& begin, int64_t& end) const {
    segment_row_range(p.segments, segment, first, k_end, p.segment_rows_k, begin, end);
  }

  // The buffer of the block's step-th chunk.
  LINATTN_HD static uint32_t buffer(int64_t step) { return static_cast<uint32_t>((step & 1) * L::kBuffer); }

  LINATTN_HD static constexpr bool fading() { return kFading; }

  // --- gates per channel (kChannels) ------------------------------------------------------------
  // As the forward's (forward_block.h): the chunk's G (kGates, loaded as the chunk is prepared),
  // each factor inside a product as an operand's elementwise factor, the pair weights
  // Σ_c φ(k)_jc φ(q)_ic e^{G_ic − G_jc} of dv's scores by split mma between 16-row blocks and from
  // the diagonal blocks' fp32 sums (gated_diagonal_pairs, in a phase of their own). The parts of dq
  // and dk that sum over rows with a per-feature factor, Σ_j D_ij φ(k)_jf e^{G_if − G_jf}, factor
  // through a reference row r between the two blocks (e^{G_if − G_rf} · e^{G_rf − G_jf}, each <= 1):
  // the other block's rows scaled as a B operand, the sum's rows afterwards; within a diagonal block
  // element by element in fp32 (gated_diagonal_terms). No factor exceeds 1 for log-gates <= 0.

  using Gates = warp::ChannelGates<L::kGates, L::kGatePitch>;
  LINATTN_HD static constexpr Gates gates() { return {}; }
  LINATTN_HD static float gate_sum(const WarpContext& w, int r, int c) { return Gates::at(w, r, c); }

  // Whether the chunk's diagonal pair weights are wanted: the causal key-value pass's dv.
  LINATTN_HD bool wants_diagonal_pairs() const {
    return kChannels && p.causal && p.pass == BackwardPass::kKeyValue;
  }
  LINATTN_HD void diagonal_pairs(const WarpContext& w, uint32_t base) const {
    gated_diagonal_pairs<scalar_t, L>(w, base, p.feature_dim);
  }

  // The reference row of row block rb's sums over other blocks: its first row (dq: the earlier
  // blocks' keys) or the next block's first (dk: the later blocks' queries; the chunk's last row for
  // the last block, which has none).
  LINATTN_HD static int reference_row(int rb, bool reverse) {
    return reverse ? (rb + 1) * 16 < kChunk ? (rb + 1) * 16 : kChunk - 1 : rb * 16;
  }

  // Calls element(r, c, x) for the lane's elements x of a warp's output tiles: chunk row
  // r = 16·rb + g (+ 8), column c = col0 + 8j + 2t (+ 1). (O: Accumulator or const Accumulator.)
  template <int kTiles, typename O, typename Element>
  LINATTN_HD static void each_output_element(const WarpContext& w, int col0, O (&o)[kTiles][4],
                                             const Element& element) {
    const int rb = warp::opaque_uniform(w.warp) % 4;
    warp::for_lanes(w, [&](int lane) {
      const int g = warp::group_of(lane), t = warp::thread_in_group(lane);
      LINATTN_UNROLL
      for (int j = 0; j < kTiles; ++j) {
        LINATTN_UNROLL
        for (int i = 0; i < 4; ++i) element(rb * 16 + g + 8 * (i / 2), col0 + j * 8 + 2 * t + i % 2, o[j][i][lane]);
      }
    });
  }

  // o's elements times factor(row, col).
  template <int kTiles, typename Factor>
  LINATTN_HD static void scale_elements(const WarpContext& w, int col0, Accumulator (&o)[kTiles][4],
                                        const Factor& factor) {
    each_output_element(w, col0, o, [&](int r, int c, float& x) { x *= factor(r, c); });
  }

  // dv's scores under gates per channel: row j of block rb (a key) against the chunk's later query
  // rows i >= j, the pair weights (gated_pair_block above the diagonal blocks, the diagonal blocks'
  // fp32 sums in them), as A fragments of 16 columns each.
  LINATTN_HD void gated_key_scores(const WarpContext& w, uint32_t base, Fragment (&scores)[kKeyBlocks][4]) const {
    const int rb = warp::opaque_uniform(w.warp) % 4;
    LINATTN_UNROLL
    for (int kk = 0; kk < kKeyBlocks; ++kk) {
      Accumulator sc[2][4];
      warp::clear(w, sc);
      if (kk > rb) {
        warp::gated_pair_block<scalar_t, DK, L::kQKPitch>(w, gates(), sc, 0, base + L::kK, rb, base + L::kQ, kk);
      }
      if (kk == rb) {
        warp::each_accumulator(w, sc, [&](int r, int col, float& x) {
          const int row = rb * 16 + r, query = kk * 16 + col;
          x = query >= row ? diagonal_pair<L>(w, query, row) : 0.0f;
        });
      }
      warp::for_lanes(w, [&](int lane) {
        LINATTN_UNROLL
        for (int i = 0; i < 4; ++i) {
          scores[kk][i][lane] = warp::pack<scalar_t>(sc[i / 2][2 * (i % 2)][lane], sc[i / 2][2 * (i % 2) + 1][lane]);
        }
      });
    }
  }

  // o += Σ over the other 16-row blocks (before rb, or after it `reverse`) of scores · (Y ⊙ F): Y's
  // rows at y (the warp's first column col0 there), F_kf = e^{±(G_kf − G_rf)} <= 1 through rb's
  // reference row r; then the diagonal block exactly, in fp32 (gated_diagonal_terms) — o's rows to
  // be scaled by the other half of the factor in between (see the callers).
  template <int kTiles>
  LINATTN_HD void times_gated_blocks(const WarpContext& w, const Fragment (&scores)[kKeyBlocks][4], uint32_t y,
                                     int col0, bool reverse, Accumulator (&o)[kTiles][4]) const {
    const int rb = warp::opaque_uniform(w.warp) % 4, ref = reference_row(rb, reverse);
    const float sign = reverse ? 1.0f : -1.0f;  // later rows: e^{G − G_r}; earlier: e^{G_r − G}
    LINATTN_UNROLL
    for (int kk = 0; kk < kKeyBlocks; ++kk) {
      if (reverse ? kk <= rb : kk >= rb) continue;
      const uint32_t block_rows = static_cast<uint32_t>(warp::opaque(static_cast<int>(y + kk * 16 * L::kQKPitch)));
      LINATTN_UNROLL
      for (int j = 0; j < kTiles; ++j) {
        Fragment bf[2];
        warp::rows_as_b_operand(w, block_rows + j * 16, L::kQKPitch, bf);
        warp::scale_b_operand<scalar_t>(w, bf, [&](int row, int col) {
          const int feature = col0 + j * 8 + col;
          return warp::exp_of(sign * (gate_sum(w, kk * 16 + row, feature) - gate_sum(w, ref, feature)));
        });
        warp::mma_16816<scalar_t>(o[j], scores[kk], bf);
      }
    }
  }

  // o += the diagonal block's Σ_k score(row, k) · Y_kf e^{G_later,f − G_earlier,f} over visible pairs
  // (k <= row, or k >= row `reverse`), in fp32 through the warp's scratch (add_visible_pairs: a masked pair
  // meets no Inf or NaN).
  template <int kTiles>
  LINATTN_HD void gated_diagonal_terms(const WarpContext& w, const Fragment (&scores)[kKeyBlocks][4], uint32_t y,
                                       int col0, bool reverse, Accumulator (&o)[kTiles][4]) const {
    const int rb = warp::opaque_uniform(w.warp) % 4;
    const uint32_t rows = y + rb * 16 * L::kQKPitch;
    add_visible_pairs<scalar_t>(
        w, L::kScratch + w.warp * 16 * 16 * 4, scores, rb,
        [&](int row, int key) { return reverse ? key >= row : key <= row; },
        [&](int row, int key, int j, int c) {
          const int f = col0 + j * 8 + c;
          const int later = rb * 16 + (reverse ? key : row), earlier = rb * 16 + (reverse ? row : key);
          return shared_element<scalar_t>(w, rows + key * L::kQKPitch + f * 2) *
                 warp::exp_of(gate_sum(w, later, f) - gate_sum(w, earlier, f));
        },
        o);
  }

  // Gates per channel: dL/dc's terms of the warp's rows and columns, o ⊙ X into row_terms (B, H, T,
  // m): the query pass writes φ(q) ⊙ dφ(q) (times row_scale), the key-value pass (`keys`, launched
  // after it) subtracts φ(k) ⊙ dφ(k).
  template <int kTiles>
  LINATTN_HD void channel_terms(const WarpContext& w, const Accumulator (&o)[kTiles][4], int col0, uint32_t base,
                                int64_t start, int64_t end, bool keys) const {
    const uint32_t x = base + (keys ? L::kK : L::kQ);
    each_output_element(w, col0, o, [&](int r, int f, float dx) {
      const int64_t row = start + r;
      // (A padded key's φ(k) is 0 and adds nothing: not 0 · dφ(k), which may be Inf or NaN there.)
      if (row >= end || f >= p.feature_dim || (keys && padded(row))) return;
      const float term = dx * shared_element<scalar_t>(w, x + r * L::kQKPitch + f * 2) *
                         (keys ? 1.0f : row_scale(w, base, r));
      float* const at = p.row_terms + (bh * p.q_len + row) * p.feature_dim + f;
      warp::store_global(w, at, keys ? warp::load_global(w, at) - term : term);
    });
  }

  // Whether the chunk's Q rows are loaded: the query pass needs them only for φ'(q) and a fading
  // state's φ(q)·dφ(q); the key-value pass and its segment sums (Σ φ(q) G'ᵀ) always.
  LINATTN_HD bool wants_queries() const {
    return p.pass != BackwardPass::kQuery || p.feature_map != kFeatureIdentity || fading();
  }

  // --- loads (as the forward's: each thread prepares the 16-byte pieces it copied) -------------

  LINATTN_HD warp::RowTile<scalar_t> rows_of(Operand operand) const {
    if (operand == Operand::kQuery) return {&p.q, p.q_vector, q_end, p.feature_dim, DK, L::kQKPitch, L::kQ};
    if (operand == Operand::kKey) return {&p.k, p.k_vector, k_end, p.feature_dim, DK, L::kQKPitch, L::kK};
    if (operand == Operand::kValue) return {&p.v, p.v_vector, k_end, p.value_dim, DV, L::kVPitch, L::kV};
    return {&cotangent, p.grad_vector, q_end, p.value_dim, DV, L::kGPitch, L::kG};
  }

  // Issues the loads of a chunk: its query-side rows (Q, G) and/or key-side rows (K, V).
  LINATTN_HD void issue_chunk(const WarpContext& w, uint32_t base, int64_t start, bool queries, bool keys) const {
    auto load = [&](Operand operand) { warp::copy_rows<kThreads, kChunk>(w, rows_of(operand), b, h, base, start); };
    if (queries) {
      if (wants_queries()) load(Operand::kQuery);
      load(Operand::kCotangent);
    }
    if (keys) {
      load(Operand::kKey);
      load(Operand::kValue);
    }
    if (w.warp == 0) warp::for_lanes(w, [&](int lane) {
      if (lane == 0) warp::store_shared<uint32_t>(w, base + L::kFlags, 0u);
    });
    warp::cp_async_commit(w);
  }

  LINATTN_HD bool padded(int64_t key) const {
    return p.key_padding != nullptr && p.key_padding[b * p.k_len + key];
  }

  LINATTN_HD void raise_flag(const WarpContext& w, uint32_t base, int flag) const {
    warp::store_shared<uint8_t>(w, base + L::kFlags + flag, 1);
  }

  // φ of Q or K rows, 0 in a padded key's row and past the head dim; raises the operand's flag
  // where φ holds Inf or NaN. Outside the query pass, float16's φ(q_i) is taken times the row's
  // scale σ_i (it meets G'_i / σ_i in every product there).
  LINATTN_HD void prepare_features(const WarpContext& w, Operand operand, uint32_t base, int64_t start) const {
    const warp::RowTile<scalar_t> x = rows_of(operand);
    const int flag = operand == Operand::kQuery ? L::kQueryFlag : L::kKeyFlag;
    warp::each_piece<kThreads, kChunk>(w, x, [&](int r, int col) {
      const int64_t row = start + r;
      const bool valid = row < x.rows && (operand == Operand::kQuery || !padded(row));
      const uint32_t at = base + x.offset + static_cast<uint32_t>(r * x.pitch + col * 2);
      warp::Words4 piece = warp::load_shared<warp::Words4>(w, at);
      const int64_t left = x.dim - col;
      float scale = 1.0f;
      if constexpr (kRowScaled) {
        if (operand == Operand::kQuery && p.pass != BackwardPass::kQuery && p.normalize && valid) {
          scale = warp::load_global(w, p.row_scalars + kRowScalars * (bh * p.q_len + row) + 2);
        }
      }
      feature_piece<scalar_t>(p.feature_map, !valid ? 0 : left < 8 ? static_cast<int>(left) : 8, piece, scale);
      bool finite = true;
      LINATTN_UNROLL
      for (int i = 0; i < 4; ++i) finite = finite && warp::finite_pair<scalar_t>(piece.word[i]);
      warp::store_shared<warp::Words4>(w, at, piece);
      if (!finite) raise_flag(w, base, flag);
    });
  }

  // V rows, 0 in a padded key's row.
  LINATTN_HD void prepare_values(const WarpContext& w, uint32_t base, int64_t start) const {
    if (p.key_padding == nullptr) return;
    const warp::RowTile<scalar_t> x = rows_of(Operand::kValue);
    warp::each_piece<kThreads, kChunk>(w, x, [&](int r, int col) {
      if (start + r >= x.rows || !padded(start + r)) return;
      const uint32_t at = base + x.offset + static_cast<uint32_t>(r * x.pitch + col * 2);
      LINATTN_UNROLL
      for (int i = 0; i < 4; ++i) warp::store_shared<uint32_t>(w, at + 4 * i, 0u);
    });
  }

  // The cotangent rows as G' = [g / d | gn as hi + lo] (gn at columns DV, DV + 1, then zeros), the
  // same in both passes, so that a pair's weight (G'_i · [v_j | 1]) rounds alike in each (the
  // gradient of a fading state's log factors is a difference of the two passes' sums). In rounds
  // in which a row's pieces are DV / 8 consecutive lanes of one warp (the lane of its first piece
  // speaks for the row). The query pass computes the row's scalars: 1 / d (0 where d vanished, 1
  // unnormalized) and gn = −G · o with G = g / d rounded to 16 bits as the mma sees it, summed by
  // the row's lanes with shuffles, so that v_j · G + gn is exactly 0 where v_j = o (one key: the
  // gradient of q and k is 0 there; with gn = −(g · o) / d instead, bf16's rounding of G left 40%
  // of the tests' floor in dk); a row whose g is all 0 gets 0s (it passes nothing, not 0 · o). It
  // writes them to row_scalars, from which the key-value pass takes them without reading o.
  // float16 holds a row as G' / σ (row_scales). Raises the cotangent flag where G holds Inf or NaN.
  LINATTN_HD void prepare_cotangent(const WarpContext& w, uint32_t base, int64_t start) const {
    constexpr int kPiecesPerRow = DV / 8;
    static_assert(kChunk * kPiecesPerRow % kThreads == 0, "every lane has a piece in every round");
    LINATTN_UNROLL
    for (int round = 0; round < kChunk * kPiecesPerRow / kThreads; ++round) {
      auto piece = [&](int lane, int& r, int& col) {
        const int e = round * kThreads + w.warp * warp::kWarpSize + lane;
        r = e / kPiecesPerRow;
        col = e % kPiecesPerRow * 8;
      };
      Lanes<int> leader;  // the lane of the row's first piece
      warp::for_lanes(w, [&](int lane) { leader[lane] = lane & ~(kPiecesPerRow - 1); });
      Lanes<float> inv, gn, scale;
      warp::for_lanes(w, [&](int lane) { scale[lane] = 0.0f; });
      if (p.pass == BackwardPass::kQuery) {
        row_scalars_of(w, base, start, piece, leader, inv, gn, scale);
      } else {
        warp::for_lanes(w, [&](int lane) {
          int r = 0, col = 0;
          piece(lane, r, col);
          const int64_t row = start + r;
          inv[lane] = gn[lane] = 0.0f;
          if (col != 0 || row >= q_end) return;
          const float* scalars = p.row_scalars + kRowScalars * (bh * p.q_len + row);
          inv[lane] = warp::load_global(w, scalars);
          gn[lane] = warp::load_global(w, scalars + 1);
        });
        inv = warp::shuffle(w, inv, leader);
      }
      warp::for_lanes(w, [&](int lane) {
        int r = 0, col = 0;
        piece(lane, r, col);
        const uint32_t at = base + L::kG + static_cast<uint32_t>(r * L::kGPitch + col * 2);
        bool non_finite = false;
        LINATTN_UNROLL
        for (int i = 0; i < 4; ++i) {
          const uint32_t pair = warp::load_shared<uint32_t>(w, at + 4 * i);
          const uint32_t scaled = warp::pack<scalar_t>(warp::unpack_lo<scalar_t>(pair) * inv[lane],
                                                       warp::unpack_hi<scalar_t>(pair) * inv[lane]);
          non_finite = non_finite || !warp::finite_pair<scalar_t>(scaled);
          warp::store_shared<uint32_t>(w, at + 4 * i, scaled);
        }
        if (non_finite) raise_flag(w, base, L::kCotangentFlag);
        if (col == 0) {
          const uint32_t extra = base + L::kG + static_cast<uint32_t>(r * L::kGPitch + DV * 2);
          const float hi = warp::round_to<scalar_t>(gn[lane]);
          warp::store_shared<uint32_t>(w, extra, warp::pack<scalar_t>(hi, gn[lane] - hi));
          // (The query pass's σ at DV + 2, for row_scale; 0 elsewhere: U's update reads it.)
          warp::store_shared<float>(w, extra + 4, kRowScaled ? scale[lane] : 0.0f);
          LINATTN_UNROLL
          for (int i = 2; i < 4; ++i) warp::store_shared<uint32_t>(w, extra + 4 * i, 0u);
        }
      });
    }
  }

  // Query pass, one round of prepare_cotangent: each row's 1 / d (in every lane of the row, `inv`),
  // gn (in its first lane) and scale σ (kRowScaled; both others divided by it), also written to
  // row_scalars.
  template <typename Piece>
  LINATTN_HD void row_scalars_of(const WarpContext& w, uint32_t base, int64_t start, const Piece& piece,
                                 const Lanes<int>& leader, Lanes<float>& inv, Lanes<float>& gn,
                                 Lanes<float>& scale) const {
    constexpr int kPiecesPerRow = DV / 8;
    // The row's 1 / d, read once by its first lane (0 where d vanished; unnormalized: 1).
    warp::for_lanes(w, [&](int lane) {
      int r = 0, col = 0;
      piece(lane, r, col);
      const int64_t row = start + r;
      inv[lane] = 1.0f;
      if (col != 0 || row >= q_end || !p.normalize) return;
      const float den = warp::load_global(w, p.normalizer + bh * p.q_len + row);
      inv[lane] = fused::inverse_unless_vanished(den);
    });
    inv = warp::shuffle(w, inv, leader);
    warp::for_lanes(w, [&](int lane) { scale[lane] = 1.0f; });
    if constexpr (kRowScaled) {
      if (p.normalize) scale = row_scales(w, base, start, piece, inv);
    }
    Lanes<float> rounded_dot, nonzero;
    warp::for_lanes(w, [&](int lane) {
      int r = 0, col = 0;
      piece(lane, r, col);
      const int64_t row = start + r;
      float rounded_sum = 0.0f, any = 0.0f;
      LINATTN_UNROLL
      for (int i = 0; i < 8; ++i) {
        if (row >= q_end || col + i >= p.value_dim) continue;
        const float g = shared_element<scalar_t>(w, base + L::kG + r * L::kGPitch + (col + i) * 2);
        if (g == 0.0f) continue;  // adds nothing, not 0 · Inf
        any = 1.0f;
        if (p.normalize) {
          const float o = warp::load_global(w, &p.out.at(b, h, row, col + i));
          rounded_sum += warp::round_to<scalar_t>(g * inv[lane]) * o;
        }
      }
      rounded_dot[lane] = rounded_sum;
      nonzero[lane] = any;
    });
    const auto sum = [](float mine, float other) { return mine + other; };
    rounded_dot = warp::butterfly<kPiecesPerRow>(w, rounded_dot, sum);
    nonzero = warp::butterfly<kPiecesPerRow>(w, nonzero, sum);
    warp::for_lanes(w, [&](int lane) {
      int r = 0, col = 0;
      piece(lane, r, col);
      const int64_t row = start + r;
      if constexpr (kRowScaled) {
        // gn past the limit too (|G · o| of a row of large outputs): a further power of two, the
        // same as dividing before the rounding, short of float16's subnormals.
        const float further = warp::power_of_two_above(::fabsf(rounded_dot[lane]), kRowScaleLimit);
        scale[lane] *= further;
        inv[lane] /= further;
        rounded_dot[lane] /= further;
      }
      if (row >= q_end || nonzero[lane] == 0.0f) inv[lane] = 0.0f;
      gn[lane] = inv[lane] != 0.0f ? -rounded_dot[lane] : 0.0f;
      if (col != 0 || row >= q_end) return;
      float* scalars = p.row_scalars + kRowScalars * (bh * p.q_len + row);
      warp::store_global(w, scalars, inv[lane]);
      warp::store_global(w, scalars + 1, gn[lane]);
      warp::store_global(w, scalars + 2, scale[lane]);
    });
  }

  // float16, normalized: each row's first scale (in every lane of the row), and inv divided by it:
  // the power of two that keeps max |g / d| / σ within kRowScaleLimit (before rounding), σ > 1
  // only where d is tiny against g (a row that sees almost nothing, d near eps); for a row whose
  // max |g / d| is below kRowSmallLimit, about its square root (BackwardProblem); 1 for the rows
  // between. (gn's bound comes after its sum: row_scalars_of.)
  template <typename Piece>
  LINATTN_HD Lanes<float> row_scales(const WarpContext& w, uint32_t base, int64_t start, const Piece& piece,
                                     Lanes<float>& inv) const {
    constexpr int kPiecesPerRow = DV / 8;
    Lanes<float> largest;
    warp::for_lanes(w, [&](int lane) {
      int r = 0, col = 0;
      piece(lane, r, col);
      largest[lane] = 0.0f;
      if (start + r >= q_end) return;
      LINATTN_UNROLL
      for (int i = 0; i < 8; ++i) {
        const float g = shared_element<scalar_t>(w, base + L::kG + r * L::kGPitch + (col + i) * 2);
        largest[lane] = ::fmaxf(largest[lane], ::fabsf(g * inv[lane]));  // (columns past dv hold 0)
      }
    });
    largest = warp::butterfly<kPiecesPerRow>(w, largest, [](float mine, float other) { return ::fmaxf(mine, other); });
    Lanes<float> scale;
    warp::for_lanes(w, [&](int lane) {
      const float x = largest[lane];
      scale[lane] = x > 0.0f && x < kRowSmallLimit ? warp::power_of_two_near_square_root(x)
                                                   : warp::power_of_two_above(x, kRowScaleLimit);
      inv[lane] /= scale[lane];
    });
    return scale;
  }

  // Once the chunk's copies issued by this warp have landed: prepares what it copied.
  LINATTN_HD void prepare_chunk(const WarpContext& w, uint32_t base, int64_t start, bool queries, bool keys) const {
    warp::cp_async_wait<0>(w);
    if constexpr (kChannels) {
      const int64_t left = k_end - start;
      warp::load_cumulative_gates<kChunk, DK>(w, gates(), p.log_decay + (bh * p.k_len + start) * p.feature_dim,
                                              p.feature_dim, static_cast<int>(left < kChunk ? left : kChunk),
                                              p.feature_dim, [](int, float g) { return g; });
    } else if (fading()) {
      load_chunk_decay<L>(w, p.log_decay + bh * p.k_len, k_end, start, base);
    }
    if (queries) {
      if (wants_queries()) prepare_features(w, Operand::kQuery, base, start);
      prepare_cotangent(w, base, start);
    }
    if (keys) {
      prepare_features(w, Operand::kKey, base, start);
      prepare_values(w, base, start);
    }
  }

  LINATTN_HD bool flag(const WarpContext& w, uint32_t base, int which) const {
    return warp::load_shared<uint8_t>(w, base + L::kFlags + which) != 0;
  }

  // gn of chunk row r (hi + lo, as the mma sees G').
  LINATTN_HD float normalizer_cotangent(const WarpContext& w, uint32_t base, int r) const {
    const uint32_t at = base + L::kG + r * L::kGPitch + DV * 2;
    return shared_element<scalar_t>(w, at) + shared_element<scalar_t>(w, at + 2);
  }

  // Key-value pass: u of feature f, from the state copy's hi and lo parts of columns DV and DV + 1.
  LINATTN_HD float u_of(const WarpContext& w, int f) const {
    const uint32_t at = f * L::kUPitch + DV * 2;
    return (shared_element<scalar_t>(w, L::kState + at) + shared_element<scalar_t>(w, L::kULow + at)) +
           (shared_element<scalar_t>(w, L::kState + at + 2) + shared_element<scalar_t>(w, L::kULow + at + 2));
  }

  // --- the state ------------------------------------------------------------------------------

  // U from dS_N (zeros without one).
  LINATTN_HD void load_u(const WarpContext& w, KeyValueState<DK, DV>& s) const {
    s.each_element(w, [&](bool mine, int row, int col, float& x) {
      const int64_t c = augmented_state_column(col, DV, 0, p.value_dim);
      const bool stored = mine && p.state_in.data != nullptr && row < p.feature_dim && c >= 0;
      x = stored ? warp::load_global(w, p.state_in.at(state_index, row, c)) : 0.0f;
    });
  }

  // U after the block's first chunk: dS0 (kKeyValue), the segment's sum (kKeyValueSums); u is the
  // sum of its columns DV and DV + 1 (from gn's hi and lo parts).
  LINATTN_HD void store_u(const WarpContext& w, KeyValueState<DK, DV>& s) const {
    if (p.state_out.data == nullptr) return;
    s.fold_column_pair(w, DV);
    s.each_element(w, [&](bool mine, int row, int col, float& x) {
      const int64_t c = augmented_state_column(col, DV, 0, p.value_dim);
      if (mine && row < p.feature_dim && c >= 0) warp::store_global(w, p.state_out.at(state_index, row, c), x);
    });
  }

  // Sᵀ (rows: value columns, columns: features) and z from the forward's state (zeros without one).
  LINATTN_HD void load_s(const WarpContext& w, QueryState<DK, DV>& s) const {
    const bool given = p.state_in.data != nullptr;
    s.each_element(w, [&](bool mine, int row, int col, float& x) {
      const bool stored = mine && given && row < p.value_dim && col < p.feature_dim;
      x = stored ? warp::load_global(w, p.state_in.at(state_index, col, row)) : 0.0f;
    });
    warp::for_lanes(w, [&](int lane) {
      const int f = w.warp * warp::kWarpSize + lane;
      if (f >= DK) return;
      const bool stored = given && f < p.feature_dim;
      const float z = stored ? warp::load_global(w, p.state_in.at(state_index, f, p.value_dim)) : 0.0f;
      warp::store_shared<float>(w, L::kZ + f * 4, z);
    });
  }

  // Query pass with state_out: the final state [S | z] (from Sᵀ and z).
  LINATTN_HD void store_s(const WarpContext& w, QueryState<DK, DV>& s) const {
    if (p.state_out.data == nullptr) return;
    s.each_element(w, [&](bool mine, int row, int col, float& x) {
      if (!mine || row >= p.value_dim || col >= p.feature_dim) return;
      warp::store_global(w, p.state_out.at(state_index, col, row), x);
    });
    warp::for_lanes(w, [&](int lane) {
      const int f = w.warp * warp::kWarpSize + lane;
      if (f >= p.feature_dim) return;
      warp::store_global(w, p.state_out.at(state_index, f, p.value_dim), warp::load_shared<float>(w, L::kZ + f * 4));
    });
  }

  // z += the column sums of the chunk's φ(K) rows (0 in padded and past-the-end rows); with a
  // fading state z = e^{b_last} z + Σ e^{b_last − b_j} φ(k_j), in fp32 as Sᵀ takes it (accumulate).
  LINATTN_HD void add_key_sums(const WarpContext& w, uint32_t base) const {
    constexpr bool fade = kFading;
    warp::for_lanes(w, [&](int lane) {
      const int f = w.warp * warp::kWarpSize + lane;
      if (f >= DK) return;
      float sum = 0.0f;
      for (int r = 0; r < kChunk; ++r) {
        float x = shared_element<scalar_t>(w, base + L::kK + r * L::kQKPitch + f * 2);
        if constexpr (kChannels) {
          x *= warp::exp_of(gate_sum(w, kChunk - 1, f) - gate_sum(w, r, f));
        } else if (fade) {
          x *= decay_row(w, base + L::kKeyFade, r);
        }
        sum += x;
      }
      const float before = warp::load_shared<float>(w, L::kZ + f * 4);
      const float faded = kChannels ? before * warp::exp_of(gate_sum(w, kChunk - 1, f))
                          : fade    ? before * chunk_fade(w, base)
                                    : before;
      warp::store_shared<float>(w, L::kZ + f * 4, faded + sum);
    });
  }

  // A fading state: e^{b_last}, what the state is worth across the whole chunk.
  LINATTN_HD static float chunk_fade(const WarpContext& w, uint32_t base) {
    return decay_row(w, base + L::kRowFade, kChunk - 1);
  }

  // A fading state, before the chunk's rows join the state: state ×= e^{b_last}; gates per channel
  // fade feature f's row of U (or column of Sᵀ) by e^{G_last,f}.
  template <typename State>
  LINATTN_HD void fade_state(const WarpContext& w, State& s, uint32_t base) const {
    if (!fading()) return;
    if constexpr (kChannels) {
      constexpr bool feature_rows = std::is_same_v<State, KeyValueState<DK, DV>>;
      s.each_element(w, [&](bool, int row, int col, float& x) {
        x *= warp::exp_of(gate_sum(w, kChunk - 1, feature_rows ? row : col));
      });
      return;
    }
    const float fade = chunk_fade(w, base);
    s.each_element(w, [&](bool, int, int, float& x) { x *= fade; });
  }

  // state += Xᵀ · Y over the chunk's `rows` rows: X rows at x (pitch xp) give the state's rows,
  // Y rows at y (pitch yp) its columns. U += φ(Q)ᵀ G' (Y with gn at column DV), Sᵀ += Vᵀ φ(K).
  // With `factors` (a chunk's fp32 row array, kNoFactors for none) row r enters weighted by
  // factors[r], in X's copy as hi + lo: two mma, so that the state holds the products to fp32's
  // precision, as the other pass's rows see them (the gradient of the log factors is a difference
  // of the two passes' sums); in the key-value pass U_v and u take the same products and still
  // cancel. (X's fragment is split once for all of a row tile's columns.)
  //
  // Gates per channel (`channels`: which operand holds the features) weight elementwise instead:
  // kFeaturesInX (U += (φ(Q) ⊙ e^G)ᵀ G', X's element (feature, row)) or kFeaturesInY
  // (Sᵀ += Vᵀ (φ(K) ⊙ e^{G_last − G}), Y's element (row, feature)), as hi + lo likewise.
  static constexpr uint32_t kNoFactors = ~0u;
  enum class ChannelSide : int { kNone = 0, kFeaturesInX = 1, kFeaturesInY = 2 };
  template <ChannelSide channels = ChannelSide::kNone, typename State>
  LINATTN_HD static void accumulate(const WarpContext& w, State& s, uint32_t x, int xp, uint32_t y, int yp, int rows,
                                    uint32_t factors) {
    // (Factors come with the fading instance only: kNoFactors otherwise. The B fragments are
    // loaded one by one: all of a row tile's at once spill at 128 × 128.)
    constexpr bool scaled = kFading && !kChannels;
    for (int kk = 0; kk * 16 < rows; ++kk) {
      Lanes<float> f[4];
      if constexpr (scaled) k_row_factors(w, factors, kk, f);
      LINATTN_UNROLL
      for (int r = 0; r < State::kRowTilesPerWarp; ++r) {
        int mi = 0, ni = 0;
        State::tile(w.warp, r * State::kColsPerWarp, mi, ni);
        Fragment a[4], a_lo[4];
        warp::rows_as_a_operand_transposed(w, x + kk * 16 * xp + mi * 32, xp, a);
        if constexpr (scaled) split_scaled_a_columns<scalar_t>(w, f, a, a_lo);
        if constexpr (channels == ChannelSide::kFeaturesInX) {
          warp::split_scale_a_operand<scalar_t>(w, a, a_lo, [&](int row, int col) {
            return warp::exp_of(gate_sum(w, kk * 16 + col, mi * 16 + row));
          });
        }
        LINATTN_UNROLL
        for (int c = 0; c < State::kColsPerWarp; ++c) {
          const int slot = r * State::kColsPerWarp + c;
          if (!State::tile(w.warp, slot, mi, ni)) continue;
          Fragment bf[2];
          warp::rows_as_b_operand(w, y + kk * 16 * yp + ni * 16, yp, bf);
          if constexpr (channels == ChannelSide::kFeaturesInY) {
            Fragment b_lo[2];
            warp::split_scale_b_operand<scalar_t>(w, bf, b_lo, [&](int row, int col) {
              const int feature = ni * 8 + col;
              return warp::exp_of(gate_sum(w, kChunk - 1, feature) - gate_sum(w, kk * 16 + row, feature));
            });
            warp::mma_16816<scalar_t>(s.state[slot], a, bf);
            warp::mma_16816<scalar_t>(s.state[slot], a, b_lo);
          } else {
            warp::mma_16816<scalar_t>(s.state[slot], a, bf);
            if constexpr (scaled || channels == ChannelSide::kFeaturesInX) {
              warp::mma_16816<scalar_t>(s.state[slot], a_lo, bf);
            }
          }
        }
      }
    }
  }

  // --- products of a chunk --------------------------------------------------------------------

  // The masked scores of rows 16·rb.. against the chunk's 64 columns, finish(row, col, X_rb · Yᵀ)
  // over kSteps 16-column slices (X rows at x, Y rows at y), as A fragments of 16 columns each.
  // Forwards (`reverse` false) column j is seen by rows i >= j; backwards rows j see columns
  // i >= j. Masked pairs are 0 (an Inf or NaN computed there is dropped).
  template <int kSteps, typename Finish>
  LINATTN_HD static void masked_scores(const WarpContext& w, uint32_t x, int xp, uint32_t y, int yp,
                                                      bool reverse, const Finish& finish,
                                                      Fragment (&scores)[kKeyBlocks][4]) {
    // One 16-column block at a time (its two score tiles packed before the next starts: registers
    // for 8 fp32 tiles at once are what the kernel lacks); a block wholly masked is 0 without mma.
    const int rb = warp::opaque_uniform(w.warp) % 4;
    LINATTN_UNROLL
    for (int kk = 0; kk < kKeyBlocks; ++kk) {
      Accumulator sc[2][4];
      warp::clear(w, sc);
      if (reverse ? kk >= rb : kk <= rb) {
        LINATTN_UNROLL
        for (int ks = 0; ks < kSteps; ++ks) {
          Fragment a[4];
          warp::rows_as_a_operand(w, x + rb * 16 * xp + ks * 32, xp, a);
          LINATTN_UNROLL
          for (int half = 0; half < 2; ++half) {
            Fragment bf[2];
            warp::rows_as_b_operand_transposed(w, y + (kk * 16 + half * 8) * yp + ks * 32, yp, bf);
            warp::mma_16816<scalar_t>(sc[half], a, bf);
          }
        }
      }
      warp::for_lanes(w, [&](int lane) {
        // (warp::opaque: the rows and columns are computed here for each block, not kept across
        // the chunk loop; `finish` may index shared memory by them.)
        const int lane_index = warp::opaque(lane);
        const int g = warp::group_of(lane_index), t = warp::thread_in_group(lane_index);
        LINATTN_UNROLL
        for (int half = 0; half < 2; ++half) {
          LINATTN_UNROLL
          for (int i = 0; i < 4; ++i) {
            const int row = rb * 16 + g + 8 * (i / 2), col = kk * 16 + half * 8 + 2 * t + i % 2;
            const bool visible = reverse ? col >= row : col <= row;
            sc[half][i][lane] = visible ? finish(row, col, sc[half][i][lane]) : 0.0f;
          }
        }
        // The C fragments of the two score tiles are the A fragment of their 16 columns.
        LINATTN_UNROLL
        for (int i = 0; i < 4; ++i) {
          scores[kk][i][lane] = warp::pack<scalar_t>(sc[i / 2][2 * (i % 2)][lane], sc[i / 2][2 * (i % 2) + 1][lane]);
        }
      });
    }
  }

  // o += X_rb · T over kSteps 16-row slices of T (X rows at x; T's rows at t, the warp's first
  // column there): a row block times a state copy.
  // With `factor`, X's element (row r of the block, column c) enters as X · factor(16·rb + r, c).
  struct NoFactor {};
  template <int kSteps, int kTiles, typename Factor = NoFactor>
  LINATTN_HD static void times_state(const WarpContext& w, uint32_t x, int xp, uint32_t t, int tp,
                                     Accumulator (&o)[kTiles][4], const Factor& factor = {}) {
    const int rb = warp::opaque_uniform(w.warp) % 4;
    LINATTN_UNROLL
    for (int ks = 0; ks < kSteps; ++ks) {
      Fragment a[4];
      warp::rows_as_a_operand(w, x + rb * 16 * xp + ks * 32, xp, a);
      if constexpr (!std::is_same_v<Factor, NoFactor>) {
        warp::scale_a_operand<scalar_t>(w, a, [&](int r, int c) { return factor(rb * 16 + r, ks * 16 + c); });
      }
      LINATTN_UNROLL
      for (int j = 0; j < kTiles; ++j) {
        Fragment bf[2];
        warp::rows_as_b_operand(w, t + ks * 16 * tp + j * 16, tp, bf);
        warp::mma_16816<scalar_t>(o[j], a, bf);
      }
    }
  }

  // o += Σ over the chunk's visible 16-row blocks: scores · Y (Y rows at y, the warp's first column
  // there). The diagonal block goes through add_visible_pairs when `exact` (Y holds Inf or NaN).
  template <int kTiles>
  LINATTN_HD void times_rows(const WarpContext& w, const Fragment (&scores)[kKeyBlocks][4], uint32_t y,
                                            int yp, bool reverse, bool exact, Accumulator (&o)[kTiles][4]) const {
    const int rb = warp::opaque_uniform(w.warp) % 4;
    LINATTN_UNROLL
    for (int kk = 0; kk < kKeyBlocks; ++kk) {
      if ((reverse ? kk < rb : kk > rb) || (kk == rb && exact)) continue;
      // (warp::opaque: the block's row addresses are computed here, not kept across the chunk loop.)
      const uint32_t block_rows = static_cast<uint32_t>(warp::opaque(static_cast<int>(y + kk * 16 * yp)));
      LINATTN_UNROLL
      for (int j = 0; j < kTiles; ++j) {
        Fragment bf[2];
        warp::rows_as_b_operand(w, block_rows + j * 16, yp, bf);
        warp::mma_16816<scalar_t>(o[j], scores[kk], bf);
      }
    }
    if (!exact) return;
    const uint32_t rows = y + rb * 16 * yp;
    add_visible_pairs<scalar_t>(
        w, L::kScratch + w.warp * 16 * 16 * 4, scores, rb,
        [&](int row, int key) { return reverse ? key >= row : key <= row; },
        [&](int, int key, int j, int c) { return shared_element<scalar_t>(w, rows + key * yp + (j * 8 + c) * 2); },
        o);
  }

  // Writes a warp's output tiles (chunk rows 16·rb.. from sequence row `start`, columns from col0)
  // into rows [.., end) and columns [0, dim) of `out`, a (bh, len, dim) 16-bit tensor (rows
  // tile.pitch apart if set), or, a tile's part of a gradient summed over tiles, as `tile` says
  // (GradientTile): the element x of chunk row r, column c as value(r, c, x). A lane's two
  // neighbouring 16-bit columns leave as one 4-byte store when dim and the pitch are even (their
  // address then is too); the row check is made once per row.
  template <int kTiles, typename Value>
  LINATTN_HD void store_output(const WarpContext& w, const Accumulator (&o)[kTiles][4], int col0, int64_t start,
                               int64_t end, int64_t len, int64_t dim, scalar_t* out, const GradientTile& tile,
                               const Value& value) const {
    const int rb = warp::opaque_uniform(w.warp) % 4;
    const int64_t pitch = tile.pitch != 0 ? tile.pitch : dim;
    const bool paired = dim % 2 == 0 && pitch % 2 == 0;
    warp::for_lanes(w, [&](int lane) {
      const int g = warp::group_of(lane), t = warp::thread_in_group(lane);
      LINATTN_UNROLL
      for (int half = 0; half < 2; ++half) {
        const int r = rb * 16 + g + 8 * half;
        const int64_t row = start + r;
        if (row >= end) continue;
        LINATTN_UNROLL
        for (int j = 0; j < kTiles; ++j) {
          const int c = col0 + j * 8 + 2 * t;
          if (c >= dim) continue;
          float x0 = value(r, c, o[j][2 * half][lane]), x1 = value(r, c + 1, o[j][2 * half + 1][lane]);
          if (tile.part != Partial::kWhole) {
            float* const sum = tile.sum + (bh * len + row) * dim + c;
            const bool second = c + 1 < dim;
            if (tile.part != Partial::kFirst) {
              x0 += warp::load_global(w, sum);
              if (second) x1 += warp::load_global(w, sum + 1);
            }
            if (tile.part != Partial::kLast) {
              warp::store_global(w, sum, x0);
              if (second) warp::store_global(w, sum + 1, x1);
              continue;
            }
          }
          warp::store_column_pair(w, out + (bh * len + row) * pitch, c, dim, paired, x0, x1);
        }
      }
    });
  }

  // o's rows (16·rb + g, + 8) × a chunk's fp32 row array.
  template <int kTiles>
  LINATTN_HD static void scale_rows(const WarpContext& w, uint32_t array, Accumulator (&o)[kTiles][4]) {
    const int rb = warp::opaque_uniform(w.warp) % 4;
    warp::for_lanes(w, [&](int lane) {
      LINATTN_UNROLL
      for (int half = 0; half < 2; ++half) {
        const float f = decay_row(w, array, rb * 16 + warp::group_of(lane) + 8 * half);
        LINATTN_UNROLL
        for (int j = 0; j < kTiles; ++j) {
          o[j][2 * half][lane] *= f;
          o[j][2 * half + 1][lane] *= f;
        }
      }
    });
  }

  // The query pass: what chunk row r's dφ(q) is multiplied by as it leaves (its row terms, dq):
  // float16's σ (G' entered as G' / σ), read where each element is (not a pass over the tiles,
  // which cost the kernels registers); 1 otherwise.
  LINATTN_HD float row_scale(const WarpContext& w, uint32_t base, int r) const {
    if constexpr (kRowScaled) {
      if (p.normalize) return warp::load_shared<float>(w, base + L::kG + r * L::kGPitch + (DV + 2) * 2);
    }
    return 1.0f;
  }

  // e^{b_later − b_earlier}: the weight of a pair of the chunk's rows under a fading state.
  LINATTN_HD static float pair_fade(const WarpContext& w, uint32_t base, int later, int earlier) {
    return warp::exp_of(decay_row(w, base + L::kCumulativeDecay, later) -
                        decay_row(w, base + L::kCumulativeDecay, earlier));
  }

  // A fading state's row terms of dL/dc: sum[half] += Σ over the lane's elements of row
  // 16·rb + g + 8·half of o(r, c) · X(r, c) (o's columns from col0; X the chunk's φ(q) rows, times
  // row_scale, or its φ(k) rows `keys`; chunk row r is sequence row start + r), then
  // store_row_terms. A padded key adds nothing: its φ(k) is 0, its dφ(k) may be Inf or NaN.
  template <int kTiles>
  LINATTN_HD void row_products(const WarpContext& w, const Accumulator (&o)[kTiles][4], int col0, uint32_t base,
                               int64_t start, bool keys, Lanes<float> (&sum)[2]) const {
    const int rb = warp::opaque_uniform(w.warp) % 4;
    const uint32_t x = base + (keys ? L::kK : L::kQ);
    warp::for_lanes(w, [&](int lane) {
      const int g = warp::group_of(lane), t = warp::thread_in_group(lane);
      LINATTN_UNROLL
      for (int j = 0; j < kTiles; ++j) {
        LINATTN_UNROLL
        for (int i = 0; i < 4; ++i) {
          const int r = rb * 16 + g + 8 * (i / 2), c = col0 + j * 8 + 2 * t + i % 2;
          // (Rows past the sequence's end are not stored, and have no mask entry to read.)
          if (c >= p.feature_dim || (keys && start + r < k_end && padded(start + r))) continue;
          const float scale = keys ? 1.0f : row_scale(w, base, r);
          sum[i / 2][lane] += o[j][i][lane] * shared_element<scalar_t>(w, x + r * L::kQKPitch + c * 2) * scale;
        }
      }
    });
  }

  // Sums each row's four lanes and writes the rows' terms to row_terms[..., slot].
  LINATTN_HD void store_row_terms(const WarpContext& w, Lanes<float> (&sum)[2], int64_t start, int slot) const {
    const int rb = warp::opaque_uniform(w.warp) % 4;
    for (int offset = 1; offset < 4; offset *= 2) {
      Lanes<int> partner;
      warp::for_lanes(w, [&](int lane) { partner[lane] = lane ^ offset; });
      LINATTN_UNROLL
      for (int half = 0; half < 2; ++half) {
        const Lanes<float> other = warp::shuffle(w, sum[half], partner);
        warp::for_lanes(w, [&](int lane) { sum[half][lane] += other[lane]; });
      }
    }
    warp::for_lanes(w, [&](int lane) {
      if (warp::thread_in_group(lane) != 0) return;
      LINATTN_UNROLL
      for (int half = 0; half < 2; ++half) {
        const int64_t row = start + rb * 16 + warp::group_of(lane) + 8 * half;
        if (row < q_end) warp::store_global(w, p.row_terms + (bh * p.q_len + row) * 4 + slot, sum[half][lane]);
      }
    });
  }

  LINATTN_HD static void clear_sums(const WarpContext& w, Lanes<float> (&sum)[2]) {
    warp::for_lanes(w, [&](int lane) { sum[0][lane] = sum[1][lane] = 0.0f; });
  }

  // o = G_i Sᵀ + gn_i z for the warp's rows and features f0 .. (the earlier chunks' part of dφ(q)).
  template <int kPart>
  LINATTN_HD void query_state_part(const WarpContext& w, uint32_t base, int f0, Accumulator (&o)[kPart][4]) const {
    const int rb = warp::opaque_uniform(w.warp) % 4;
    warp::clear(w, o);
    times_state<DV / 16>(w, base + L::kG, L::kGPitch, L::kState + f0 * 2, L::kSPitch, o);
    times_state<DV / 16>(w, base + L::kG, L::kGPitch, L::kStateLow + f0 * 2, L::kSPitch, o);
    Scales::unscale(w, o);
    warp::for_lanes(w, [&](int lane) {
      const int g = warp::group_of(lane), t = warp::thread_in_group(lane);
      LINATTN_UNROLL
      for (int j = 0; j < kPart; ++j) {
        LINATTN_UNROLL
        for (int i = 0; i < 4; ++i) {
          const int r = rb * 16 + g + 8 * (i / 2), f = f0 + j * 8 + 2 * t + i % 2;
          o[j][i][lane] += normalizer_cotangent(w, base, r) * warp::load_shared<float>(w, L::kZ + f * 4);
        }
      }
    });
  }

  // dq = dφ(q) ⊙ φ'(q) (times row_scale) of the warp's rows (chunk rows from `start`) and columns
  // from f0.
  template <int kPart>
  LINATTN_HD void store_query_gradient(const WarpContext& w, uint32_t base, int64_t start, int f0,
                                       const Accumulator (&o)[kPart][4]) const {
    store_output(w, o, f0, start, q_end, p.q_len, p.feature_dim, p.grad_q, p.grad_q_tile, [&](int r, int f, float x) {
      x *= row_scale(w, base, r);
      if (p.feature_map == kFeatureIdentity) return x;
      const float phi = shared_element<scalar_t>(w, base + L::kQ + r * L::kQKPitch + f * 2);
      return x * derivative_from_feature(p.feature_map, phi);
    });
  }

  // dq under gates per channel (the causal query pass):
  //   dφ(q)_i = e^{G_i} ⊙ (G_i Sᵀ + gn_i z) + Σ_{j <= i in the chunk} D_ij φ(k_j) ⊙ e^{G_i − G_j},
  //   D_ij = G_i · v_j + gn_i, formed as ((G_i Sᵀ + gn_i z) ⊙ e^{G_r} + Σ_{earlier blocks} D (φ(K) ⊙
  //   e^{G_r − G})) ⊙ e^{G_i − G_r} plus the diagonal block's terms, r the row block's first row;
  // each element's φ(q) ⊙ dφ(q) goes to row_terms.
  LINATTN_HD void channel_query_gradient(const WarpContext& w, uint32_t base, int64_t start) const {
    const int rb = w.warp % 4, ch = w.warp / 4, ref = reference_row(rb, false);
    if (start + rb * 16 >= q_end) return;
    constexpr int kPart = 2;
    Fragment scores[kKeyBlocks][4];
    masked_scores<DV / 16>(w, base + L::kG, L::kGPitch, base + L::kV, L::kVPitch, false,
                           [&](int row, int, float x) { return x + normalizer_cotangent(w, base, row); }, scores);
    LINATTN_UNROLL
    for (int part = 0; part < kFeatureTiles / kPart; ++part) {
      const int f0 = ch * (DK / 2) + part * kPart * 8;
      Accumulator o[kPart][4];
      query_state_part(w, base, f0, o);
      scale_elements(w, f0, o, [&](int, int f) { return warp::exp_of(gate_sum(w, ref, f)); });
      times_gated_blocks(w, scores, base + L::kK + f0 * 2, f0, false, o);
      scale_elements(w, f0, o, [&](int r, int f) { return warp::exp_of(gate_sum(w, r, f) - gate_sum(w, ref, f)); });
      gated_diagonal_terms(w, scores, base + L::kK, f0, false, o);
      channel_terms(w, o, f0, base, start, q_end, false);
      store_query_gradient(w, base, start, f0, o);
    }
  }

  // dq for the chunk's rows 16·rb.. and the warp's half of the features:
  //   dφ(q)_i = G_i Sᵀ + gn_i z + Σ_{j <= i in the chunk} (G_i · v_j + gn_i) φ(k_j),
  //   dq = dφ(q) ⊙ φ'(q);
  // a fading state weights the state's part by e^{b_i} and pair (i, j) by e^{b_i − b_j}, and each
  // row's φ(q)·dφ(q) goes to row_terms. The pairs' weights are the key-value pass's (its dφ(k)),
  // bit for bit. G and v enter the products as they are and Sᵀ as hi + lo: the state's two terms
  // cancel where o_i is close to what Sᵀ gives, so they keep fp32's precision until the difference.
  LINATTN_HD void query_gradient(const WarpContext& w, uint32_t base, int64_t start) const {
    if constexpr (kChannels) {
      channel_query_gradient(w, base, start);
      return;
    }
    const int rb = w.warp % 4, ch = w.warp / 4;
    if (start + rb * 16 >= q_end) return;
    constexpr bool fade = kFading;
    // (Registers bound the order, as in key_value_gradients: the scores packed to 16 bits first,
    // then the warp's features in parts of 32 columns, 16 with a fading state.)
    constexpr int kPart = kFading ? 2 : 4;
    Fragment scores[kKeyBlocks][4];
    if (p.causal) {
      masked_scores<DV / 16>(w, base + L::kG, L::kGPitch, base + L::kV, L::kVPitch, false,
                             [&](int row, int col, float x) {
                               x += normalizer_cotangent(w, base, row);
                               return fade ? x * pair_fade(w, base, row, col) : x;
                             },
                             scores);
    }
    Lanes<float> sum[2];
    if (fade) clear_sums(w, sum);
    LINATTN_UNROLL
    for (int part = 0; part < kFeatureTiles / kPart; ++part) {
      const int f0 = ch * (DK / 2) + part * kPart * 8;
      Accumulator o[kPart][4];
      query_state_part(w, base, f0, o);
      if (fade) scale_rows(w, base + L::kRowFade, o);
      if (p.causal) times_rows(w, scores, base + L::kK + f0 * 2, L::kQKPitch, false, flag(w, base, L::kKeyFlag), o);
      if (fade) row_products(w, o, f0, base, start, false, sum);
      store_query_gradient(w, base, start, f0, o);
    }
    if (fade) store_row_terms(w, sum, start, ch);
  }

  // o = U_v v_j + u for the warp's key rows and features f0 .. (the later chunks' part of dφ(k)).
  template <int kPart>
  LINATTN_HD void key_state_part(const WarpContext& w, uint32_t base, int f0, Accumulator (&o)[kPart][4]) const {
    const int rb = warp::opaque_uniform(w.warp) % 4;
    warp::clear(w, o);
    // U_v v_j: Uᵀ's rows are U's columns, so the state copy is read as a transposed B operand;
    // hi and lo, as u is (the two cancel where v_j is close to the later rows' outputs). (One
    // part after the other, V's fragments loaded twice: both at once spilled at 128 × 128.)
    LINATTN_UNROLL
    for (int part_of_u = 0; part_of_u < 2; ++part_of_u) {
      const int origin = part_of_u == 0 ? L::kState : L::kULow;
      LINATTN_UNROLL
      for (int ks = 0; ks < DV / 16; ++ks) {
        Fragment a[4];
        warp::rows_as_a_operand(w, base + L::kV + rb * 16 * L::kVPitch + ks * 32, L::kVPitch, a);
        LINATTN_UNROLL
        for (int j = 0; j < kPart; ++j) {
          Fragment bf[2];
          warp::rows_as_b_operand_transposed(w, origin + (f0 + j * 8) * L::kUPitch + ks * 32, L::kUPitch, bf);
          warp::mma_16816<scalar_t>(o[j], a, bf);
        }
      }
    }
    // + u, the whole state's part faded to key j.
    warp::for_lanes(w, [&](int lane) {
      const int t = warp::thread_in_group(lane);
      LINATTN_UNROLL
      for (int j = 0; j < kPart; ++j) {
        LINATTN_UNROLL
        for (int i = 0; i < 4; ++i) o[j][i][lane] += u_of(w, f0 + j * 8 + 2 * t + i % 2);
      }
    });
    Scales::unscale(w, o);
  }

  // dk = dφ(k) ⊙ φ'(k) of the warp's key rows and columns from f0, 0 for padded keys.
  template <int kPart>
  LINATTN_HD void store_key_gradient(const WarpContext& w, uint32_t base, int64_t start, int f0,
                                     const Accumulator (&o)[kPart][4]) const {
    store_output(w, o, f0, start, k_end, p.k_len, p.feature_dim, p.grad_k, p.grad_k_tile, [&](int r, int f, float x) {
      x *= derivative_from_feature(p.feature_map, shared_element<scalar_t>(w, base + L::kK + r * L::kQKPitch + f * 2));
      return padded(start + r) ? 0.0f : x;
    });
  }

  // dv and dk under gates per channel (the causal key-value pass):
  //   dv_j = (φ(k_j) ⊙ e^{G_last − G_j}) U_v + Σ_{i >= j in the chunk} P_ji G_i, P the pair weights
  //   (gated_key_scores);
  //   dφ(k)_j = e^{G_last − G_j} ⊙ (U_v v_j + u) + Σ_{i >= j} E_ji φ(q_i) ⊙ e^{G_i − G_j},
  //   E_ji = v_j · G_i + gn_i, formed as ((U_v v_j + u) ⊙ e^{G_last − G_r} + Σ_{later blocks} E (φ(Q) ⊙
  //   e^{G − G_r})) ⊙ e^{G_r − G_j} plus the diagonal block's terms, r the next block's first row;
  // each element's φ(k) ⊙ dφ(k) is subtracted from row_terms; 0 for padded keys.
  LINATTN_HD void channel_key_value_gradients(const WarpContext& w, uint32_t base, int64_t start) const {
    const int warp_index = warp::opaque_uniform(w.warp), rb = warp_index % 4, ch = warp_index / 4;
    const int ref = reference_row(rb, true);
    if (start + rb * 16 >= k_end) return;
    constexpr int kPart = 2;
    {
      Fragment scores[kKeyBlocks][4];
      gated_key_scores(w, base, scores);
      LINATTN_UNROLL
      for (int part = 0; part < kValueTiles / kPart; ++part) {
        const int c0 = ch * (DV / 2) + part * kPart * 8;
        Accumulator o[kPart][4];
        warp::clear(w, o);
        times_state<DK / 16>(w, base + L::kK, L::kQKPitch, L::kState + c0 * 2, L::kUPitch, o, [&](int r, int f) {
          return warp::exp_of(gate_sum(w, kChunk - 1, f) - gate_sum(w, r, f));
        });
        Scales::unscale(w, o);
        times_rows(w, scores, base + L::kG + c0 * 2, L::kGPitch, true, flag(w, base, L::kCotangentFlag), o);
        store_output(w, o, c0, start, k_end, p.k_len, p.value_dim, p.grad_v, p.grad_v_tile,
                     [&](int r, int, float x) { return padded(start + r) ? 0.0f : x; });
      }
    }
    Fragment scores[kKeyBlocks][4];
    masked_scores<DV / 16>(w, base + L::kV, L::kVPitch, base + L::kG, L::kGPitch, true,
                           [&](int, int col, float x) { return x + normalizer_cotangent(w, base, col); }, scores);
    LINATTN_UNROLL
    for (int part = 0; part < kFeatureTiles / kPart; ++part) {
      const int f0 = ch * (DK / 2) + part * kPart * 8;
      Accumulator o[kPart][4];
      key_state_part(w, base, f0, o);
      scale_elements(w, f0, o,
                     [&](int, int f) { return warp::exp_of(gate_sum(w, kChunk - 1, f) - gate_sum(w, ref, f)); });
      times_gated_blocks(w, scores, base + L::kQ + f0 * 2, f0, true, o);
      scale_elements(w, f0, o, [&](int r, int f) { return warp::exp_of(gate_sum(w, ref, f) - gate_sum(w, r, f)); });
      gated_diagonal_terms(w, scores, base + L::kQ, f0, true, o);
      channel_terms(w, o, f0, base, start, k_end, true);
      store_key_gradient(w, base, start, f0, o);
    }
  }

  // dv and dk for the chunk's key rows 16·rb.. and the warp's half of the columns:
  //   dv_j = φ(k_j) U_v + Σ_{i >= j in the chunk} (φ(k_j) · φ(q_i)) G_i,
  //   dφ(k)_j = U_v v_j + u + Σ_{i >= j} (v_j · G_i + gn_i) φ(q_i),   dk = dφ(k) ⊙ φ'(k);
  // 0 for padded keys. A fading state weights the state's parts by e^{b_last − b_j} and pair
  // (i, j) by e^{b_i − b_j}, and each key's φ(k)·dφ(k) goes to row_terms.
  LINATTN_HD void key_value_gradients(const WarpContext& w, uint32_t base, int64_t start) const {
    if constexpr (kChannels) {
      channel_key_value_gradients(w, base, start);
      return;
    }
    // (warp::opaque: the addresses below are recomputed in each chunk, not kept across the loop.)
    const int warp_index = warp::opaque_uniform(w.warp), rb = warp_index % 4, ch = warp_index / 4;
    if (start + rb * 16 >= k_end) return;
    constexpr bool fade = kFading;
    // (Registers bound the order: the scores packed to 16 bits before any output tile starts, and
    // the warp's columns in parts of 32 (four 8-column tiles) beside U.)
    constexpr int kPart = 4;
    {
      Fragment scores[kKeyBlocks][4];
      if (p.causal) {
        masked_scores<DK / 16>(w, base + L::kK, L::kQKPitch, base + L::kQ, L::kQKPitch, true,
                               [&](int row, int col, float x) { return fade ? x * pair_fade(w, base, col, row) : x; },
                               scores);
      }
      LINATTN_UNROLL
      for (int part = 0; part < kValueTiles / kPart; ++part) {
        const int c0 = ch * (DV / 2) + part * kPart * 8;
        Accumulator o[kPart][4];
        warp::clear(w, o);
        times_state<DK / 16>(w, base + L::kK, L::kQKPitch, L::kState + c0 * 2, L::kUPitch, o);
        Scales::unscale(w, o);
        if (fade) scale_rows(w, base + L::kKeyFade, o);
        if (p.causal) {
          times_rows(w, scores, base + L::kG + c0 * 2, L::kGPitch, true, flag(w, base, L::kCotangentFlag), o);
        }
        store_output(w, o, c0, start, k_end, p.k_len, p.value_dim, p.grad_v, p.grad_v_tile,
                     [&](int r, int, float x) { return padded(start + r) ? 0.0f : x; });
      }
    }
    Fragment scores[kKeyBlocks][4];
    if (p.causal) {
      masked_scores<DV / 16>(w, base + L::kV, L::kVPitch, base + L::kG, L::kGPitch, true,
                             [&](int row, int col, float x) {
                               x += normalizer_cotangent(w, base, col);
                               return fade ? x * pair_fade(w, base, col, row) : x;
                             },
                             scores);
    }
    Lanes<float> sum[2];
    if (fade) clear_sums(w, sum);
    LINATTN_UNROLL
    for (int part = 0; part < kFeatureTiles / kPart; ++part) {
      const int f0 = ch * (DK / 2) + part * kPart * 8;
      Accumulator o[kPart][4];
      key_state_part(w, base, f0, o);
      if (fade) scale_rows(w, base + L::kKeyFade, o);
      if (p.causal) times_rows(w, scores, base + L::kQ + f0 * 2, L::kQKPitch, true, flag(w, base, L::kQueryFlag), o);
      if (fade) row_products(w, o, f0, base, start, true, sum);
      store_key_gradient(w, base, start, f0, o);
    }
    if (fade) store_row_terms(w, sum, start, 2 + ch);
  }
};

}  // namespace tensor_core
}  // namespace linattn
