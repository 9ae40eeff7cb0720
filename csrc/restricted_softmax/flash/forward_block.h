// One block of the flash engine's forward (forward.h) as the operations its phases call: which key
// tiles it visits, loading them, a key tile's scores, online softmax and P·V, and the outputs.
// Written per warp on the warp-operation layer (common/warp/).
#pragma once

#include "visibility.h"

#include <cmath>

namespace linattn {
namespace flash {

// e^x as the kernels compute it, the same expression on both sides (exp2 of a product).
LINATTN_HD inline float exp_of(float x) {
  constexpr float kLog2e = 1.4426950408889634f;
#if defined(__CUDA_ARCH__)
  return exp2f(x * kLog2e);
#else
  return std::exp2(x * kLog2e);
#endif
}

LINATTN_HD inline float minus_infinity() { return -INFINITY; }

// tanh(x / cap) of a soft-capped score (Gemma-2's logit soft-capping: the score becomes
// cap·tanh(x / cap)); the accurate tanh on both sides (within 2 ulp of each other).
LINATTN_HD inline float capped_tanh(float x, float cap) {
#if defined(__CUDA_ARCH__)
  return tanhf(x / cap);
#else
  return std::tanh(x / cap);
#endif
}

// The scaled score x with the problem's cap applied (x itself without one).
template <typename Problem>
LINATTN_HD inline float soft_capped(const Problem& p, float x) {
  return p.softcap > 0.0f ? p.softcap * capped_tanh(x, p.softcap) : x;
}

// ALiBi's term of query i and key j in batch entry b, head h (0 without slopes; i or j −1 past the
// end: any finite value, the pair is hidden).
template <typename Problem>
LINATTN_HD inline float alibi_of(const WarpContext& w, const Problem& p, int64_t b, int64_t h, int64_t i, int64_t j) {
  if (p.alibi == nullptr) return 0.0f;
  const int64_t d = i + (p.k_len - p.q_len) - j;
  return -warp::load_global(w, p.alibi + b * p.alibi_batch_stride + h) * static_cast<float>(d < 0 ? -d : d);
}

// Whether key j lies at or before query i's position a = i + T_k − T_q: the forget gates' decay
// runs forward (+1) or, past a, backwards (−1).
template <typename Problem>
LINATTN_HD inline float forget_sign(const Problem& p, int64_t i, int64_t j) {
  return j <= i + (p.k_len - p.q_len) ? 1.0f : -1.0f;
}

// The forget gates' term of query i and key j in (batch · H + head) bh: ±(c_a − c_j) (0 without
// gates, or i or j −1 past the end: the pair is hidden, and nothing out of bounds is read).
template <typename Problem>
LINATTN_HD inline float forget_of(const WarpContext& w, const Problem& p, int64_t bh, int64_t i, int64_t j) {
  if (p.forget == nullptr || i < 0 || j < 0) return 0.0f;
  const float* c = p.forget + bh * p.k_len;
  const float at_query = warp::load_global(w, c + i + (p.k_len - p.q_len)), at_key = warp::load_global(w, c + j);
  return forget_sign(p, i, j) * (at_query - at_key);
}

// Attention dropout's factor of a pair from its Philox bits (common/philox.h): dropout_scale where
// they keep it, else 0.
template <typename Problem>
LINATTN_HD inline float dropout_factor(const Problem& p, uint32_t bits) {
  return bits >= p.dropout_threshold ? p.dropout_scale : 0.0f;
}

// The maximum (or sum) of x over the four lanes of each lane group (the lanes of one row of an
// accumulator tile).
LINATTN_HD inline Lanes<float> group_reduce(const WarpContext& w, Lanes<float> x, bool maximum) {
  LINATTN_UNROLL
  for (int offset = 1; offset <= 2; offset *= 2) {
    Lanes<int> source;
    warp::for_lanes(w, [&](int lane) { source[lane] = lane ^ offset; });
    const Lanes<float> other = warp::shuffle(w, x, source);
    warp::for_lanes(w, [&](int lane) { x[lane] = maximum ? fmaxf(x[lane], other[lane]) : x[lane] + other[lane]; });
  }
  return x;
}

template <typename scalar_t, int D, int Buffers = 2>
struct FlashBlock {
  using L = Layout<D, Buffers>;
  using State = WarpState<D>;

  const FlashProblem<scalar_t>& p;
  int64_t bh, b, h;
  TokenTile rows;  // the block's queries
  Band<scalar_t> band;
  Visits visits;

  // Regular blocks own query tiles, visit the key tiles of their band (or plan) and then the
  // tiles of gathered global keys; blocks of gathered global rows visit every key tile.
  LINATTN_HD FlashBlock(const FlashProblem<scalar_t>& problem, int64_t index)
      : FlashBlock(problem, BlockTokens(problem, index, problem.q_tiles)) {}
  LINATTN_HD FlashBlock(const FlashProblem<scalar_t>& problem, const BlockTokens& block)
      : p(problem),
        bh(block.bh),
        b(block.b),
        h(block.h),
        rows(block.own),
        band(band_of(problem, rows)),
        visits(key_visits(problem, b, h, rows, band)) {}

  // How much of visit n's key tile the rows see.
  LINATTN_HD TileKind kind_of(const TokenTile& keys) const { return key_tile_kind(visits, band, rows, keys, b); }

  // The key/value buffer of visit n (alternating, or the one buffer).
  LINATTN_HD static uint32_t buffer(int64_t n) { return static_cast<uint32_t>((n % Buffers) * L::kBuffer); }

  // --- loads ---------------------------------------------------------------------------------

  LINATTN_HD warp::RowTile<scalar_t> query_rows() const {
    return {&p.q, p.q_vector, p.q_len, p.head_dim, D, L::kPitch, L::kQ};
  }
  LINATTN_HD warp::RowTile<scalar_t> key_rows() const {
    return {&p.k, p.k_vector, p.k_len, p.head_dim, D, L::kPitch, L::kK};
  }
  LINATTN_HD warp::RowTile<scalar_t> value_rows() const {
    return {&p.v, p.v_vector, p.k_len, p.value_dim, D, L::kPitch, L::kV};
  }

  // The query tile's rows (committed with the first key tile) and tokens.
  LINATTN_HD void issue_queries(const WarpContext& w) const {
    auto row = [&](int r) { return rows.token(p, b, p.q_len, r); };
    warp::copy_rows_from<kThreads, kRows>(w, query_rows(), b, h, 0, row);
    store_tokens(w, L::kRowTokens, row);
  }

  // The tile's 64 tokens (−1 past the end) at shared offset `at`, one per thread.
  template <typename Token>
  LINATTN_HD static void store_tokens(const WarpContext& w, uint32_t at, const Token& token) {
    warp::for_lanes(w, [&](int lane) {
      const int r = w.warp * warp::kWarpSize + lane;
      if (r < kRows) warp::store_shared<int32_t>(w, at + r * 4, static_cast<int32_t>(token(r)));
    });
  }

  // Whether visit n's keys share no segment with the rows: nothing is loaded or computed.
  LINATTN_HD bool skips(int64_t n) const { return segments_apart(p, b, h, rows, visits.tile(n)); }

  // Issues the copies of visit n's keys and values (commits an empty group for a skipped one).
  LINATTN_HD void issue_keys(const WarpContext& w, int64_t n) const {
    if (skips(n)) {
      warp::cp_async_commit(w);
      return;
    }
    const uint32_t base = buffer(n);
    const TokenTile keys = visits.tile(n);
    auto key = [&](int r) { return keys.token(p, b, p.k_len, r); };
    warp::copy_rows_from<kThreads, kKeys>(w, key_rows(), b, p.kv_head(h), base, key);
    warp::copy_rows_from<kThreads, kKeys>(w, value_rows(), b, p.kv_head(h), base, key);
    store_tokens(w, base + L::kKeyTokens, key);
    if (w.warp == 0) warp::for_lanes(w, [&](int lane) {
      if (lane == 0) warp::store_shared<uint8_t>(w, base + L::kNonFinite, 0);
    });
    warp::cp_async_commit(w);
  }

  // Once this warp's copies of visit n have landed: a padded key's value row becomes 0 (it is
  // never seen, and its Inf or NaN must not meet a 0 probability), and a value row that still
  // holds Inf or NaN raises the tile's flag (see exact_values).
  LINATTN_HD void prepare_keys(const WarpContext& w, int64_t n) const {
    warp::cp_async_wait<0>(w);
    if (skips(n)) return;
    const uint32_t base = buffer(n);
    const TokenTile keys = visits.tile(n);
    const warp::RowTile<scalar_t> x = value_rows();
    warp::each_piece<kThreads, kKeys>(w, x, [&](int r, int col) {
      const int64_t key = keys.token(p, b, p.k_len, r);
      const bool padded =
          key >= 0 && p.key_padding != nullptr && warp::load_global(w, p.key_padding + b * p.k_len + key);
      const uint32_t at = base + x.offset + static_cast<uint32_t>(r * x.pitch + col * 2);
      bool finite = true;
      LINATTN_UNROLL
      for (int i = 0; i < 4; ++i) {
        if (padded) warp::store_shared<uint32_t>(w, at + 4 * i, 0u);
        else finite = finite && warp::finite_pair<scalar_t>(warp::load_shared<uint32_t>(w, at + 4 * i));
      }
      if (!finite) warp::store_shared<uint8_t>(w, base + L::kNonFinite, 1);
    });
  }

  // --- one key tile ----------------------------------------------------------------------------

  // The query of row half `half` of lane group g in warp w's rows (row 16 w + g + 8 half of the
  // tile), or −1 past the end.
  LINATTN_HD int64_t row_of(const WarpContext& w, int lane, int half) const {
    return rows.token(p, b, p.q_len, w.warp * 16 + warp::group_of(lane) + 8 * half);
  }
  // The same, and key `column` of the tile in buffer `base`, from the tokens in shared memory.
  LINATTN_HD int64_t shared_row(const WarpContext& w, int lane, int half) const {
    return warp::load_shared<int32_t>(w, L::kRowTokens + (w.warp * 16 + warp::group_of(lane) + 8 * half) * 4);
  }
  LINATTN_HD static int64_t shared_key(const WarpContext& w, uint32_t base, int column) {
    return warp::load_shared<int32_t>(w, base + L::kKeyTokens + column * 4);
  }
  // Whether warp w has no rows (its first is past the end: a tile's tokens are a prefix).
  LINATTN_HD bool idle(const WarpContext& w) const { return rows.token(p, b, p.q_len, w.warp * 16) < 0; }

  LINATTN_HD static void start(const WarpContext& w, State& s) {
    warp::clear(w, s.o);
    warp::for_lanes(w, [&](int lane) {
      LINATTN_UNROLL
      for (int half = 0; half < 2; ++half) {
        s.row_max[half][lane] = minus_infinity();
        s.row_sum[half][lane] = 0.0f;
      }
    });
  }

  // The scaled scores of the warp's 16 rows against the tile's 64 keys, soft-capped, with the
  // pattern applied (score_of): −inf where a pair is hidden, the bias added, kSelfScore where fixed.
  LINATTN_HD void scores(const WarpContext& w, uint32_t base, const TokenTile& keys, TileKind kind,
                         ScoreTile& sc) const {
    rows_times_rows<scalar_t, D>(w, L::kQ + w.warp * 16 * L::kPitch, base + L::kK, L::kPitch, p.head_dim, sc);
    auto each_pair = [&](const auto& score) {
      warp::for_lanes(w, [&](int lane) {
        LINATTN_UNROLL
        for (int nt = 0; nt < kKeys / 8; ++nt) {
          LINATTN_UNROLL
          for (int i = 0; i < 4; ++i) {
            const int64_t row = shared_row(w, lane, i / 2);
            const int64_t key = shared_key(w, base, nt * 8 + 2 * warp::thread_in_group(lane) + i % 2);
            const float capped = soft_capped(p, sc[nt][i][lane] * p.scale);
            const float terms = alibi_of(w, p, b, h, row, key) + forget_of(w, p, bh, row, key);
            sc[nt][i][lane] = score(row, key, capped + terms).value;
          }
        }
      });
    };
    // (The pattern's general code per pair only where the tile needs it: once per tile.)
    if (simple_scores(p, kind)) {
      each_pair([&](int64_t row, int64_t key, float x) { return simple_score_of(p, row, key, kind, x); });
    } else {
      each_pair([&](int64_t row, int64_t key, float x) {
        return score_of(w, p, b, h, row, key, kind, x, rows.gathered, keys.gathered);
      });
    }
  }

  // Online softmax over one tile: the new running maxima, the old sums and outputs rescaled,
  // scores turned into probabilities exp(s − max) (0 where masked: exp(−inf)).
  LINATTN_HD void softmax_step(const WarpContext& w, State& s, ScoreTile& sc) const {
    Lanes<float> tile_max[2];
    warp::for_lanes(w, [&](int lane) {
      LINATTN_UNROLL
      for (int half = 0; half < 2; ++half) {
        float m = minus_infinity();
        LINATTN_UNROLL
        for (int nt = 0; nt < kKeys / 8; ++nt) m = fmaxf(m, fmaxf(sc[nt][2 * half][lane], sc[nt][2 * half + 1][lane]));
        tile_max[half][lane] = m;
      }
    });
    LINATTN_UNROLL
    for (int half = 0; half < 2; ++half) tile_max[half] = group_reduce(w, tile_max[half], true);
    Lanes<float> alpha[2];
    warp::for_lanes(w, [&](int lane) {
      LINATTN_UNROLL
      for (int half = 0; half < 2; ++half) {
        const float m_old = s.row_max[half][lane], m_new = fmaxf(m_old, tile_max[half][lane]);
        // Nothing visible yet: shift by 0 (exp(−inf) = 0 for the masked, NaN stays NaN).
        const float shift = m_new == minus_infinity() ? 0.0f : m_new;
        alpha[half][lane] = exp_of(m_old - shift);
        s.row_max[half][lane] = m_new;
        float sum = 0.0f;
        LINATTN_UNROLL
        for (int nt = 0; nt < kKeys / 8; ++nt) {
          LINATTN_UNROLL
          for (int e = 0; e < 2; ++e) {
            const float prob = exp_of(sc[nt][2 * half + e][lane] - shift);
            sc[nt][2 * half + e][lane] = prob;
            sum += prob;
          }
        }
        s.row_sum[half][lane] = s.row_sum[half][lane] * alpha[half][lane] + sum;
      }
      LINATTN_UNROLL
      for (int j = 0; j < D / 8; ++j) {
        LINATTN_UNROLL
        for (int i = 0; i < 4; ++i) s.o[j][i][lane] *= alpha[i / 2][lane];
      }
    });
  }

  // Attention dropout's keep bits of the thread's 32 pairs of a key tile (bit 4·nt + i for element
  // sc[nt][i]). Drawn before the scores, in loops that are not unrolled, so that Philox's registers
  // meet neither the score tile nor its products: at D = 256 the accumulators leave no room. A
  // thread's two neighbouring keys (columns 2t, 2t + 1) share one evaluation where they lie in one
  // quad, as a band's do. (Counters in 32 bits, as dropout_quad casts them; −1 past the end too.)
  LINATTN_HD Lanes<uint32_t> keep_bits(const WarpContext& w, uint32_t base) const {
    Lanes<uint32_t> kept;
    warp::for_lanes(w, [&](int lane) {
      const uint32_t block_head = static_cast<uint32_t>(bh);
      uint32_t bits = 0;
      LINATTN_NO_UNROLL
      for (int nt = 0; nt < kKeys / 8; ++nt) {
        const int column = nt * 8 + 2 * warp::thread_in_group(lane);
        const int32_t key0 = warp::load_shared<int32_t>(w, base + L::kKeyTokens + column * 4);
        const int32_t key1 = warp::load_shared<int32_t>(w, base + L::kKeyTokens + (column + 1) * 4);
        LINATTN_NO_UNROLL
        for (int half = 0; half < 2; ++half) {
          const uint32_t row = static_cast<uint32_t>(shared_row(w, lane, half));
          const auto quad_of = [&](int32_t key) {
            return philox4x32_10(static_cast<uint32_t>(key >> 2), row, block_head, 0u, p.dropout_seed);
          };
          const Philox4 quad = quad_of(key0);
          const uint32_t bits1 = dropout_word((key1 >> 2) == (key0 >> 2) ? quad : quad_of(key1), key1);
          const int bit = 4 * nt + 2 * half;
          bits |= static_cast<uint32_t>(dropout_word(quad, key0) >= p.dropout_threshold) << bit;
          bits |= static_cast<uint32_t>(bits1 >= p.dropout_threshold) << (bit + 1);
        }
      }
      kept[lane] = bits;
    });
    return kept;
  }

  // Attention dropout, after the step's sums (the lse stays the undropped softmax's): each
  // probability times dropout_scale where its keep bit is set, else 0.
  LINATTN_HD void drop(const WarpContext& w, const Lanes<uint32_t>& kept, ScoreTile& sc) const {
    warp::for_lanes(w, [&](int lane) {
      LINATTN_UNROLL
      for (int nt = 0; nt < kKeys / 8; ++nt) {
        LINATTN_UNROLL
        for (int i = 0; i < 4; ++i) sc[nt][i][lane] *= (kept[lane] >> (4 * nt + i)) & 1u ? p.dropout_scale : 0.0f;
      }
    });
  }

  // O += P·V on tensor cores: the probabilities' C fragments, packed to 16 bits, are the A
  // fragments of their 16 keys.
  LINATTN_HD void add_values(const WarpContext& w, State& s, uint32_t base, const ScoreTile& sc) const {
    Fragment probs[kKeys / 16][4];
    as_a_fragments<scalar_t>(w, sc, probs);
    add_product<scalar_t, D>(w, probs, base + L::kV, L::kPitch, p.value_dim, s.o);
  }

  // O += P·V term by term over the visible pairs only, for a tile whose V holds Inf or NaN: the
  // mma would multiply a masked pair's 0 by it (NaN in rows that never see the key). As the
  // reference: a visible pair adds p·v (NaN or Inf where v is), a masked one nothing. The
  // probabilities (rounded as add_values rounds them; −1 where masked) pass through the warp's
  // scratch so that each lane reads its rows' every key.
  LINATTN_HD void exact_values(const WarpContext& w, State& s, uint32_t base, const TokenTile& keys, TileKind kind,
                               const ScoreTile& sc) const {
    const uint32_t scratch = L::kScratch + w.warp * L::kScratchPerWarp;
    warp::for_lanes(w, [&](int lane) {
      LINATTN_UNROLL
      for (int nt = 0; nt < kKeys / 8; ++nt) {
        LINATTN_UNROLL
        for (int i = 0; i < 4; ++i) {
          const int64_t row = shared_row(w, lane, i / 2);
          const int column = nt * 8 + 2 * warp::thread_in_group(lane) + i % 2;
          const int64_t key = shared_key(w, base, column);
          bool visible = row >= 0 && key >= 0;
          if (visible && kind == kPartial) visible = pair_of(p, b, h, row, key, rows.gathered, keys.gathered).visible;
          const float prob = static_cast<float>(scalar_t(sc[nt][i][lane]));
          const int local_row = warp::group_of(lane) + 8 * (i / 2);
          warp::store_shared<float>(w, scratch + (local_row * kKeys + column) * 4, visible ? prob : -1.0f);
        }
      }
    });
    warp::sync(w);
    warp::for_lanes(w, [&](int lane) {
      const int g = warp::group_of(lane), t = warp::thread_in_group(lane);
      LINATTN_UNROLL
      for (int half = 0; half < 2; ++half) {
        for (int key = 0; key < kKeys; ++key) {
          const float prob = warp::load_shared<float>(w, scratch + ((g + 8 * half) * kKeys + key) * 4);
          if (prob == -1.0f) continue;
          const uint32_t value_row = base + L::kV + key * L::kPitch;
          for (int j = 0; j < D / 8; ++j) {
            LINATTN_UNROLL
            for (int e = 0; e < 2; ++e) {
              const uint16_t bits = warp::load_shared<uint16_t>(w, value_row + (j * 8 + 2 * t + e) * 2);
              s.o[j][2 * half + e][lane] += prob * static_cast<float>(scalar_t(bits, typename scalar_t::from_bits_t()));
            }
          }
        }
      }
    });
    warp::sync(w);
  }

  // Visit n of the warp's rows: scores, softmax step (and dropout), P·V.
  LINATTN_HD void attend(const WarpContext& w, State& s, int64_t n) const {
    if (idle(w) || skips(n)) return;
    const uint32_t base = buffer(n);
    const TokenTile keys = visits.tile(n);
    const TileKind kind = kind_of(keys);
    Lanes<uint32_t> kept{};  // drawn before the scores (keep_bits)
    if (p.drops()) kept = keep_bits(w, base);
    ScoreTile sc;
    scores(w, base, keys, kind, sc);
    softmax_step(w, s, sc);
    if (p.drops()) drop(w, kept, sc);
    if (warp::load_shared<uint8_t>(w, base + L::kNonFinite) != 0) exact_values(w, s, base, keys, kind, sc);
    else add_values(w, s, base, sc);
  }

  // --- the outputs -----------------------------------------------------------------------------

  // out = O / l and lse = max + log l per row; a row that saw no key gets 0 and −inf. A global
  // row is written by its gathered row block only.
  LINATTN_HD void finish(const WarpContext& w, const State& s) const {
    if (idle(w)) return;
    Lanes<float> sums[2];
    LINATTN_UNROLL
    for (int half = 0; half < 2; ++half) sums[half] = group_reduce(w, s.row_sum[half], false);
    warp::for_lanes(w, [&](int lane) {
      const int t = warp::thread_in_group(lane);
      LINATTN_UNROLL
      for (int half = 0; half < 2; ++half) {
        const int64_t row = row_of(w, lane, half);
        if (row < 0 || gathered_elsewhere(p, b, rows, row, p.q_len)) continue;
        const float l = sums[half][lane];
        const float inverse = l == 0.0f ? 0.0f : 1.0f / l;
        const int64_t out_row = (bh * p.q_len + row) * p.value_dim;
        LINATTN_UNROLL
        for (int j = 0; j < D / 8; ++j) {
          LINATTN_UNROLL
          for (int e = 0; e < 2; ++e) {
            const int64_t col = j * 8 + 2 * t + e;
            if (col >= p.value_dim) continue;
            warp::store_global(w, p.out + out_row + col, scalar_t(s.o[j][2 * half + e][lane] * inverse));
          }
        }
        if (t == 0) {
          const float lse = l == 0.0f ? minus_infinity() : s.row_max[half][lane] + logf(l);
          warp::store_global(w, p.lse + bh * p.q_len + row, lse);
        }
      }
    });
  }
};

}  // namespace flash
}  // namespace linattn
