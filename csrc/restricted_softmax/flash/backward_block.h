// The blocks of the flash engine's backward (backward.h): what they are given beside the forward's
// problem, their shared-memory layout, and the operations of their phases. Written per warp on the
// warp-operation layer (common/warp/).
#pragma once

#include "forward_block.h"

namespace linattn {
namespace flash {

// What the backward reads and writes beside the forward's problem (plan.h builds both).
template <typename scalar_t>
struct FlashGradients {
  Strided4<const scalar_t> grad_out;
  bool grad_out_vector = false;
  const float* lse = nullptr;    // (B, H, T_q): the forward's
  const float* delta = nullptr;  // (B, H, T_q): Σ_c dO·O − grad_lse per row
  scalar_t* grad_q = nullptr;    // (B, H, T_q, D) contiguous
  scalar_t* grad_k = nullptr;    // (B, H, T_k, D)
  scalar_t* grad_v = nullptr;    // (B, H, T_k, dv)
  float* grad_bias = nullptr;    // (bias_heads, T_q, T_k), zeroed; summed over batch (and heads when shared)
  // The forget gates' gradient in two parts, each written once per token: Σ_j σ·dS of each query
  // (query blocks; (B, H, T_q)) and −Σ_i σ·dS of each key (key blocks; (B, H, T_k)); plan.h adds
  // them at the tokens' positions.
  float* grad_forget_rows = nullptr;
  float* grad_forget_keys = nullptr;
  // The plan transposed (plan batch, plan heads, k tiles, q tiles): the query tiles that see each
  // key tile, as FlashProblem's plan lists key tiles (null: the window's band, transposed).
  const int32_t* seen_tiles = nullptr;
  const int32_t* seen_counts = nullptr;
  const uint8_t* seen_kinds = nullptr;
};

// Shared memory of a backward block: two resident 64-row tiles (the key block's K and V, or the
// query block's Q and dO), and two buffers of two streamed tiles each (Q and dO, or K and V) with
// the streamed query rows' lse and delta (64 floats each); or one such buffer (Layout's `Buffers`:
// D = 256 on an A100, 199 KiB double-buffered against its 163).
template <int D, int Buffers = 2>
struct BackwardLayout {
  static constexpr int kPitch = warp::padded_pitch(D * 2);
  static constexpr int kTile = kRows * kPitch;
  static constexpr int kResident0 = 0, kResident1 = kTile;
  static constexpr int kStreamed0 = 2 * kTile, kStreamed1 = 3 * kTile;  // + buffer offset
  static constexpr int kLse = 4 * kTile, kDelta = kLse + kRows * 4;      // + buffer offset
  static constexpr int kBuffer = 2 * kTile + 2 * kRows * 4;
  static constexpr int kBytes = 2 * kTile + Buffers * kBuffer;
};

// How a backward block is laid out over its warps. Each 16 rows of the block (keys or queries)
// belong to a warp that holds their gradients (dK and dV, or dQ: 16 rows × D fp32 each) in
// registers; at D = 256 those would not fit beside the products, so the block has 8 warps: warps
// w and w + 4 share 16 rows, compute the same products (S, dP), and accumulate the gradients'
// first and last 128 columns. Twice the score products per tile pair at D = 256, but the tiles
// are loaded once for both (against a second block per column half, which would read them twice).
template <int D>
struct BackwardShape {
  static constexpr int kColumnGroups = D > 128 ? 2 : 1;
  static constexpr int kColumns = D / kColumnGroups;  // of the gradients, per warp
  static constexpr int kBlockWarps = kWarps * kColumnGroups;
  static constexpr int kBlockThreads = kBlockWarps * warp::kWarpSize;
  // Blocks per SM the registers are budgeted for (255 a thread either way; D = 64 would
  // otherwise be held to 168 and spill); the shared memory at D = 256 allows one anyway.
  static constexpr int kMinBlocks = kColumnGroups == 1 ? 2 : 1;
};

// The backward's instances are the forward's (with_instance: D = 64, 128 or 256, and D = 256
// single-buffered).
inline int64_t backward_shared_bytes_of(int64_t head_dim, int64_t value_dim, int buffers = 2) {
  int64_t bytes = 0;
  with_instance(head_dim, value_dim, buffers, [&](auto d, auto n) {
    bytes = BackwardLayout<decltype(d)::value, decltype(n)::value>::kBytes;
  });
  return bytes;
}

// The streamed-tile buffers a block of the forward (or the backward) gets for these head dims when
// a block may have `max_shared_bytes`: 2, else 1 (at kSingleBufferedHeadDim only), else 0 (the
// engine does not take the call).
inline int buffers_for(int64_t head_dim, int64_t value_dim, bool backward, int64_t max_shared_bytes) {
  auto bytes = [&](int buffers) {
    return backward ? backward_shared_bytes_of(head_dim, value_dim, buffers)
                    : shared_bytes_of(head_dim, value_dim, buffers);
  };
  if (bytes(2) <= max_shared_bytes) return 2;
  if (padded_head_dim(head_dim, value_dim) == kSingleBufferedHeadDim && bytes(1) <= max_shared_bytes) return 1;
  return 0;
}

// A warp's registers across barriers: the gradient rows it accumulates (dK and dV of 16 keys, or
// dQ of 16 queries; their columns of the warp's column group), and for a query block its rows'
// lse and delta.
template <int D>
struct BackwardState {
  static constexpr int kColumns = BackwardShape<D>::kColumns;
  Accumulator first[kColumns / 8][4];   // dK or dQ (unscaled)
  Accumulator second[kColumns / 8][4];  // dV (key blocks)
  Lanes<float> lse[2], delta[2];
  Lanes<float> forget[2];  // with forget gates: Σ σ·dS over the lane's pairs of its two rows so far
};

// What both backward blocks share: the (batch, head) and own tokens of the block, its visits,
// loads, the probabilities and the stores.
template <typename scalar_t, int D, int Buffers>
struct BackwardBlockBase {
  using L = BackwardLayout<D, Buffers>;
  static constexpr int kBuffers = Buffers;
  using State = BackwardState<D>;
  using Shape = BackwardShape<D>;
  static constexpr int kWarps = Shape::kBlockWarps, kThreads = Shape::kBlockThreads;
  static constexpr int kColumns = Shape::kColumns;
  const FlashProblem<scalar_t>& p;
  const FlashGradients<scalar_t>& g;
  int64_t bh, b, h;
  TokenTile own;  // the block's queries (query blocks) or keys (key blocks)
  Visits visits;

  LINATTN_HD BackwardBlockBase(const FlashProblem<scalar_t>& problem, const FlashGradients<scalar_t>& gradients,
                               const BlockTokens& block)
      : p(problem), g(gradients), bh(block.bh), b(block.b), h(block.h), own(block.own) {}

  LINATTN_HD static uint32_t buffer(int64_t n) { return static_cast<uint32_t>((n % Buffers) * L::kBuffer); }

  // Warp w's rows of the block's tile (16 from 16 · row_warp) and the first gradient column it
  // accumulates (BackwardShape).
  LINATTN_HD static int row_warp(const WarpContext& w) { return w.warp % flash::kWarps; }
  LINATTN_HD static int first_column(const WarpContext& w) { return w.warp / flash::kWarps * kColumns; }

  LINATTN_HD warp::RowTile<scalar_t> rows(const Strided4<const scalar_t>* x, bool vector, int64_t len, int64_t dim,
                                          uint32_t offset) const {
    return {x, vector, len, dim, D, L::kPitch, offset};
  }
  LINATTN_HD warp::RowTile<scalar_t> query_rows(uint32_t offset) const {
    return rows(&p.q, p.q_vector, p.q_len, p.head_dim, offset);
  }
  LINATTN_HD warp::RowTile<scalar_t> grad_out_rows(uint32_t offset) const {
    return rows(&g.grad_out, g.grad_out_vector, p.q_len, p.value_dim, offset);
  }
  LINATTN_HD warp::RowTile<scalar_t> key_rows(uint32_t offset) const {
    return rows(&p.k, p.k_vector, p.k_len, p.head_dim, offset);
  }
  LINATTN_HD warp::RowTile<scalar_t> value_rows(uint32_t offset) const {
    return rows(&p.v, p.v_vector, p.k_len, p.value_dim, offset);
  }

  // P and dS of one product tile (in place of S and dP): P = exp(S − lse) (0 where hidden or for
  // a row that saw no key; times the dropout factor), dS = P (dP·factor − delta) where the pair
  // passes a score gradient, else 0 (times the soft cap's slope: the gradient of the raw scaled score).
  // `pair(lane, nt, i, query, key, row_gathered, key_gathered)` names the element's pair;
  // lse_of/delta_of(lane, nt, i) its query's values. `bias_gradient`: add dS to grad_bias (one of
  // the two blocks does).
  template <int N, typename Pair, typename Lse, typename Delta>
  LINATTN_HD void probabilities(const WarpContext& w, TileKind kind, ProductTile<N>& s, ProductTile<N>& dp,
                                const Pair& pair, const Lse& lse_of, const Delta& delta_of, bool bias_gradient,
                                Lanes<float> (&forget)[2]) const {
    // (The pattern's general code per pair only where the tile needs it: once per tile.)
    if (simple_scores(p, kind)) {
      each_probability<N>(w, s, dp, pair, lse_of, delta_of, bias_gradient, forget,
                          [&](int64_t query, int64_t key, bool, bool, float x) {
                            return simple_score_of(p, query, key, kind, x);
                          });
    } else {
      each_probability<N>(w, s, dp, pair, lse_of, delta_of, bias_gradient, forget,
                          [&](int64_t query, int64_t key, bool row_gathered, bool key_gathered, float x) {
                            return score_of(w, p, b, h, query, key, kind, x, row_gathered, key_gathered);
                          });
    }
  }
  // (`forget`: the lanes' running Σ σ·dS of their two rows, i / 2 the element's row; with forget gates.)
  template <int N, typename Pair, typename Lse, typename Delta, typename ScoreOf>
  LINATTN_HD void each_probability(const WarpContext& w, ProductTile<N>& s, ProductTile<N>& dp, const Pair& pair,
                                   const Lse& lse_of, const Delta& delta_of, bool bias_gradient,
                                   Lanes<float> (&forget)[2], const ScoreOf& score_at) const {
    warp::for_lanes(w, [&](int lane) {
      LINATTN_UNROLL
      for (int nt = 0; nt < N / 8; ++nt) {
        LINATTN_UNROLL
        for (int i = 0; i < 4; ++i) {
          int64_t query = 0, key = 0;
          bool row_gathered = false, key_gathered = false;
          pair(lane, nt, i, query, key, row_gathered, key_gathered);
          // A soft-capped score cap·tanh(x / cap) passes its gradient through the slope 1 − tanh².
          float scaled = s[nt][i][lane] * p.scale, slope = 1.0f;
          if (p.softcap > 0.0f) {
            const float t = capped_tanh(scaled, p.softcap);
            scaled = p.softcap * t;
            slope = 1.0f - t * t;
          }
          const float terms = alibi_of(w, p, b, h, query, key) + forget_of(w, p, bh, query, key);
          const Score score = score_at(query, key, row_gathered, key_gathered, scaled + terms);
          const float lse = lse_of(lane, nt, i);
          const float prob = lse == -INFINITY ? 0.0f : exp_of(score.value - lse);
          // With dropout, dV's P is the dropped one the forward multiplied V by, and the gradient
          // of the undropped P is dP times the factor (one Philox evaluation per element here).
          float dprob = dp[nt][i][lane];
          s[nt][i][lane] = prob;
          if (p.drops()) {
            const float keep = dropout_factor(p, dropout_bits(p.dropout_seed, bh, query, key));
            s[nt][i][lane] = prob * keep;
            dprob *= keep;
          }
          const float ds = score.gradient ? prob * (dprob - delta_of(lane, nt, i)) : 0.0f;
          dp[nt][i][lane] = score.gradient ? ds * slope : 0.0f;  // the bias's gradient is ds itself
          if (p.forget != nullptr && score.gradient) forget[i / 2][lane] += forget_sign(p, query, key) * ds;
          if (bias_gradient && g.grad_bias != nullptr && score.gradient) {
            const int64_t head = p.bias_heads == 1 ? 0 : h;
            warp::atomic_add_global(w, g.grad_bias + (head * p.q_len + query) * p.k_len + key, ds);
          }
        }
      }
    });
  }

  // The forget gates' sums of warp w's 16 rows (over the four lanes of each row's group), times
  // `sign`, into `out` (B, H, len): one lane a row, one column group (both computed the same sums).
  LINATTN_HD void store_forget(const WarpContext& w, const State& s, float* out, int64_t len, float sign) const {
    if (out == nullptr || first_column(w) != 0) return;
    LINATTN_UNROLL
    for (int half = 0; half < 2; ++half) {
      const Lanes<float> sums = group_reduce(w, s.forget[half], false);
      warp::for_lanes(w, [&](int lane) {
        const int64_t row = own.token(p, b, len, row_warp(w) * 16 + warp::group_of(lane) + 8 * half);
        if (warp::thread_in_group(lane) != 0 || row < 0 || gathered_elsewhere(p, b, own, row, len)) return;
        warp::store_global(w, out + bh * len + row, sign * sums[lane]);
      });
    }
  }

  // Warp w's 16 rows of the block's own tile of a (B, H, len, width) gradient from accumulators
  // (its column group), times `factor`.
  LINATTN_HD void store_rows(const WarpContext& w, const Accumulator (&acc)[kColumns / 8][4], scalar_t* out,
                             int64_t len, int64_t width, float factor) const {
    const int first = first_column(w);
    warp::for_lanes(w, [&](int lane) {
      const int gi = warp::group_of(lane), t = warp::thread_in_group(lane);
      LINATTN_UNROLL
      for (int half = 0; half < 2; ++half) {
        const int64_t row = own.token(p, b, len, row_warp(w) * 16 + gi + 8 * half);
        if (row < 0 || gathered_elsewhere(p, b, own, row, len)) continue;
        LINATTN_UNROLL
        for (int j = 0; j < kColumns / 8; ++j) {
          LINATTN_UNROLL
          for (int e = 0; e < 2; ++e) {
            const int64_t col = first + j * 8 + 2 * t + e;
            if (col >= width) continue;
            const scalar_t value(acc[j][2 * half + e][lane] * factor);
            warp::store_global(w, out + (bh * len + row) * width + col, value);
          }
        }
      }
    });
  }
};

// A key block: 64 keys of one (batch, head), resident K and V; it visits the query tiles that
// see them and accumulates dK = scale · Σ dSᵀ Q and dV = Σ Pᵀ dO (warp w: keys 16 w ..).
template <typename scalar_t, int D, int Buffers = 2>
struct KeyBlock : BackwardBlockBase<scalar_t, D, Buffers> {
  using Base = BackwardBlockBase<scalar_t, D, Buffers>;
  using L = typename Base::L;
  using State = typename Base::State;
  using Base::b;
  using Base::g;
  using Base::h;
  using Base::own;
  using Base::p;
  using Base::visits;
  using Base::kThreads;
  using Base::kColumns;

  // Regular key blocks visit the query tiles of the transposed band (or plan), then the tiles of
  // gathered global rows; blocks of gathered global keys visit every query tile, then those.
  LINATTN_HD KeyBlock(const FlashProblem<scalar_t>& problem, const FlashGradients<scalar_t>& gradients, int64_t index)
      : Base(problem, gradients, BlockTokens(problem, index, problem.k_tiles)) {
    if (own.gathered) {
      if (own.start >= own.count) return;
      visits.use_range(0, p.q_tiles - 1);
    } else if (g.seen_tiles != nullptr) {
      visits.use_plan(p, g.seen_tiles, g.seen_counts, g.seen_kinds, b, h, p.k_tiles, own.start / kKeys, p.q_tiles);
    } else {
      int64_t first = 0, last = 0;
      seen_by(p, own.start, own.start + kKeys < p.k_len ? own.start + kKeys : p.k_len, first, last);
      visits.use_range(first, last);
    }
    if (p.global_index != nullptr) visits.add_gathered(p.global_count[b]);
  }

  LINATTN_HD TileKind kind_of(const TokenTile& queries) const {
    if (own.gathered || queries.gathered) return kPartial;
    if (visits.kinds != nullptr) return static_cast<TileKind>(visits.kinds[queries.start / kRows]);
    return band_of(p, queries).kind(own.start / kKeys, b);
  }

  LINATTN_HD int64_t key_of(int r) const { return own.token(p, b, p.k_len, r); }

  LINATTN_HD void issue_resident(const WarpContext& w, State&) const {
    auto key = [&](int r) { return key_of(r); };
    warp::copy_rows_from<kThreads, kKeys>(w, this->key_rows(L::kResident0), b, p.kv_head(h), 0, key);
    warp::copy_rows_from<kThreads, kKeys>(w, this->value_rows(L::kResident1), b, p.kv_head(h), 0, key);
  }

  // Whether visit n's queries share no segment with the block's keys: nothing is loaded or computed.
  LINATTN_HD bool skips(int64_t n) const { return segments_apart(p, b, h, visits.tile(n), own); }

  // Visit n's query rows, dO rows, lse and delta (past the end: zeros, lse −inf).
  LINATTN_HD void issue(const WarpContext& w, int64_t n) const {
    if (skips(n)) {
      warp::cp_async_commit(w);
      return;
    }
    const uint32_t base = Base::buffer(n);
    const TokenTile queries = visits.tile(n);
    auto query = [&](int r) { return queries.token(p, b, p.q_len, r); };
    warp::copy_rows_from<kThreads, kRows>(w, this->query_rows(L::kStreamed0), b, h, base, query);
    warp::copy_rows_from<kThreads, kRows>(w, this->grad_out_rows(L::kStreamed1), b, h, base, query);
    warp::for_lanes(w, [&](int lane) {
      const int r = w.warp * warp::kWarpSize + lane;
      if (r >= kRows) return;
      const int64_t row = query(r), at = this->bh * p.q_len + row;
      const bool inside = row >= 0;
      warp::store_shared<float>(w, base + L::kLse + r * 4, inside ? warp::load_global(w, g.lse + at) : -INFINITY);
      warp::store_shared<float>(w, base + L::kDelta + r * 4, inside ? warp::load_global(w, g.delta + at) : 0.0f);
    });
    warp::cp_async_commit(w);
  }

  // The query tile in two halves of 32 columns: the products of a half (Sᵀ, dPᵀ) beside dK and
  // dV (16 rows × D each, fp32) fit the registers at D = 128, a whole tile's would spill.
  static constexpr int kHalf = kRows / 2;

  LINATTN_HD void attend(const WarpContext& w, State& s, int64_t n) const {
    const int rw = Base::row_warp(w), first = Base::first_column(w);
    if (key_of(rw * 16) < 0 || skips(n)) return;
    const uint32_t base = Base::buffer(n);
    const TokenTile queries = visits.tile(n);
    const TileKind kind = kind_of(queries);
    const uint32_t warp_rows = static_cast<uint32_t>(rw * 16 * L::kPitch);
    LINATTN_UNROLL
    for (int half = 0; half < 2; ++half) {
      const uint32_t rows = static_cast<uint32_t>(half * kHalf * L::kPitch);
      const uint32_t streamed_queries = base + L::kStreamed0 + rows, grad_out = base + L::kStreamed1 + rows;
      ProductTile<kHalf> st, dpt;  // Sᵀ and dPᵀ: the warp's 16 keys × 32 queries
      rows_times_rows<scalar_t, D, kHalf>(w, L::kResident0 + warp_rows, streamed_queries, L::kPitch, p.head_dim, st);
      rows_times_rows<scalar_t, D, kHalf>(w, L::kResident1 + warp_rows, grad_out, L::kPitch, p.value_dim, dpt);
      auto column = [&](int lane, int nt, int i) {
        return half * kHalf + nt * 8 + 2 * warp::thread_in_group(lane) + i % 2;
      };
      this->template probabilities<kHalf>(
          w, kind, st, dpt,
          [&](int lane, int nt, int i, int64_t& query, int64_t& key, bool& row_gathered, bool& key_gathered) {
            query = queries.token(p, b, p.q_len, column(lane, nt, i));
            key = key_of(rw * 16 + warp::group_of(lane) + 8 * (i / 2));
            row_gathered = queries.gathered;
            key_gathered = own.gathered;
          },
          [&](int lane, int nt, int i) {
            return warp::load_shared<float>(w, base + L::kLse + column(lane, nt, i) * 4);
          },
          [&](int lane, int nt, int i) {
            return warp::load_shared<float>(w, base + L::kDelta + column(lane, nt, i) * 4);
          },
          false, s.forget);
      // The warp's column group of dV += Pᵀ dO and dK += dSᵀ Q.
      const uint32_t columns = static_cast<uint32_t>(first * 2);
      Fragment a[kHalf / 16][4];
      as_a_fragments<scalar_t, kHalf>(w, st, a);
      add_product<scalar_t, kColumns, kHalf>(w, a, grad_out + columns, L::kPitch, p.value_dim - first, s.second);
      as_a_fragments<scalar_t, kHalf>(w, dpt, a);
      add_product<scalar_t, kColumns, kHalf>(w, a, streamed_queries + columns, L::kPitch, p.head_dim - first,
                                             s.first);
    }
  }

  LINATTN_HD void finish(const WarpContext& w, const State& s) const {
    this->store_rows(w, s.first, g.grad_k, p.k_len, p.head_dim, p.scale);
    this->store_rows(w, s.second, g.grad_v, p.k_len, p.value_dim, 1.0f);
    this->store_forget(w, s, g.grad_forget_keys, p.k_len, -1.0f);
  }
};

// A query block: 64 queries of one (batch, head), resident Q and dO; it visits the key tiles they
// see (as the forward) and accumulates dQ = scale · Σ dS K (warp w: queries 16 w ..).
template <typename scalar_t, int D, int Buffers = 2>
struct QueryBlock : BackwardBlockBase<scalar_t, D, Buffers> {
  using Base = BackwardBlockBase<scalar_t, D, Buffers>;
  using L = typename Base::L;
  using State = typename Base::State;
  using Base::b;
  using Base::g;
  using Base::h;
  using Base::own;
  using Base::p;
  using Base::visits;
  using Base::kThreads;
  using Base::kColumns;
  Band<scalar_t> band;

  // The forward's visits (FlashBlock).
  LINATTN_HD QueryBlock(const FlashProblem<scalar_t>& problem, const FlashGradients<scalar_t>& gradients,
                        int64_t index)
      : Base(problem, gradients, BlockTokens(problem, index, problem.q_tiles)), band(band_of(problem, own)) {
    visits = key_visits(p, b, h, own, band);
  }

  LINATTN_HD TileKind kind_of(const TokenTile& keys) const { return key_tile_kind(visits, band, own, keys, b); }

  LINATTN_HD int64_t row_of(const WarpContext& w, int lane, int half) const {
    return own.token(p, b, p.q_len, Base::row_warp(w) * 16 + warp::group_of(lane) + 8 * half);
  }

  // Q and dO rows, and each lane's rows' lse and delta into its registers.
  LINATTN_HD void issue_resident(const WarpContext& w, State& s) const {
    auto query = [&](int r) { return own.token(p, b, p.q_len, r); };
    warp::copy_rows_from<kThreads, kRows>(w, this->query_rows(L::kResident0), b, h, 0, query);
    warp::copy_rows_from<kThreads, kRows>(w, this->grad_out_rows(L::kResident1), b, h, 0, query);
    warp::for_lanes(w, [&](int lane) {
      LINATTN_UNROLL
      for (int half = 0; half < 2; ++half) {
        const int64_t row = row_of(w, lane, half), at = this->bh * p.q_len + row;
        s.lse[half][lane] = row >= 0 ? warp::load_global(w, g.lse + at) : -INFINITY;
        s.delta[half][lane] = row >= 0 ? warp::load_global(w, g.delta + at) : 0.0f;
      }
    });
  }

  // Whether visit n's keys share no segment with the block's queries (as the forward).
  LINATTN_HD bool skips(int64_t n) const { return segments_apart(p, b, h, own, visits.tile(n)); }

  LINATTN_HD void issue(const WarpContext& w, int64_t n) const {
    if (skips(n)) {
      warp::cp_async_commit(w);
      return;
    }
    const uint32_t base = Base::buffer(n);
    const TokenTile keys = visits.tile(n);
    auto key = [&](int r) { return keys.token(p, b, p.k_len, r); };
    warp::copy_rows_from<kThreads, kKeys>(w, this->key_rows(L::kStreamed0), b, p.kv_head(h), base, key);
    warp::copy_rows_from<kThreads, kKeys>(w, this->value_rows(L::kStreamed1), b, p.kv_head(h), base, key);
    warp::cp_async_commit(w);
  }

  LINATTN_HD void attend(const WarpContext& w, State& s, int64_t n) const {
    if (row_of(w, 0, 0) < 0 || skips(n)) return;  // (lane 0's first row: the warp's first)
    const uint32_t base = Base::buffer(n);
    const TokenTile keys = visits.tile(n);
    const int first = Base::first_column(w);
    const uint32_t warp_rows = static_cast<uint32_t>(Base::row_warp(w) * 16 * L::kPitch);
    ScoreTile sc, dp;  // S and dP: the warp's 16 queries × the tile's 64 keys
    rows_times_rows<scalar_t, D>(w, L::kResident0 + warp_rows, base + L::kStreamed0, L::kPitch, p.head_dim, sc);
    rows_times_rows<scalar_t, D>(w, L::kResident1 + warp_rows, base + L::kStreamed1, L::kPitch, p.value_dim, dp);
    this->template probabilities<kKeys>(
        w, kind_of(keys), sc, dp,
        [&](int lane, int nt, int i, int64_t& query, int64_t& key, bool& row_gathered, bool& key_gathered) {
          query = row_of(w, lane, i / 2);
          key = keys.token(p, b, p.k_len, nt * 8 + 2 * warp::thread_in_group(lane) + i % 2);
          row_gathered = own.gathered;
          key_gathered = keys.gathered;
        },
        [&](int lane, int, int i) { return s.lse[i / 2][lane]; },
        [&](int lane, int, int i) { return s.delta[i / 2][lane]; }, first == 0,  // (one column group adds)
        s.forget);
    Fragment a[kKeys / 16][4];
    as_a_fragments<scalar_t>(w, dp, a);
    add_product<scalar_t, kColumns>(w, a, base + L::kStreamed0 + static_cast<uint32_t>(first * 2), L::kPitch,
                                    p.head_dim - first, s.first);  // dQ += dS K, the warp's columns
  }

  LINATTN_HD void finish(const WarpContext& w, const State& s) const {
    this->store_rows(w, s.first, g.grad_q, p.q_len, p.head_dim, p.scale);
    this->store_forget(w, s, g.grad_forget_rows, p.q_len, 1.0f);
  }
};

}  // namespace flash
}  // namespace linattn
