// Included by the per-instruction-set sources that setup.py generates (common/cpu_isa.h), after
// common/cpu_kernel_prelude.h and inside their target pragma.
//
// CPU kernels of restricted softmax attention (docs/methods.md §5–§6: sliding window, dilation,
// Longformer global tokens, block-sparse layouts, key padding): one flash-style engine for
// every pattern, a pattern saying which keys a query block visits and which pairs are visible.
// A query block of 64 rows walks its key groups (a window's band, plus global keys; a layout
// row's present blocks), each scored by one GEMM, masked by the pattern, and folded into a
// running max and sum; the backward recomputes the probabilities from the saved per-row
// logsumexp. Never a T×T matrix: scratch is O(block·(group + D)) per thread (plus the
// key-gradient accumulators in the backward).
//
// Masked pairs are excluded: their probability is set to 0 from the predicate (not computed
// as exp(−inf)), and the products with values / keys / queries skip them whenever an operand
// holds an Inf or NaN (common/masked_product.h). A row that sees no key gets 0 and lse = −inf.
#include "kernel.h"
#include "../common/cpu_gemm.h"
#include "../common/fast_math.h"
#include "../common/masked_product.h"
#include "../common/philox.h"
#include "../common/row_loader.h"
#include "../common/row_reductions.h"

namespace linattn {
namespace LINATTN_ISA {
namespace {

constexpr int64_t kBlock = 64;        // query rows per block
constexpr int64_t kKeyGroup = 256;    // keys per group: larger GEMMs, fewer online-softmax rescales

template <typename acc_t>
constexpr acc_t minus_infinity() {
  return -std::numeric_limits<acc_t>::infinity();
}

// The keys one query block visits, in groups of at most kKeyGroup indices.
struct KeyGroups {
  std::vector<std::vector<int64_t>> groups;

  void add_range(int64_t begin, int64_t end) {
    for (int64_t j0 = begin; j0 < end; j0 += kKeyGroup) {
      std::vector<int64_t> g;
      for (int64_t j = j0; j < std::min(end, j0 + kKeyGroup); ++j) g.push_back(j);
      groups.push_back(std::move(g));
    }
  }
  void add_list(const std::vector<int64_t>& keys) {
    for (size_t i0 = 0; i0 < keys.size(); i0 += kKeyGroup)
      groups.emplace_back(keys.begin() + i0, keys.begin() + std::min(keys.size(), i0 + kKeyGroup));
  }
};

// The first key when the group is one run of consecutive keys (a window's block, a band), else
// −1: per-pair loops then index rows directly, which vectorizes, instead of through `keys`.
// Groups hold ascending distinct keys (KeyGroups), so first/last/size identify a run.
inline int64_t run_start(const std::vector<int64_t>& keys) {
  return !keys.empty() && keys.back() - keys.front() + 1 == static_cast<int64_t>(keys.size()) ? keys.front() : -1;
}

// vr[c] stays visible only where the key's per-token value equals id (segment ids); on a run
// (first >= 0) the values are read in place.
inline void keep_equal(unsigned char* vr, const int64_t* values, int64_t id, const int64_t* key, int64_t n,
                       int64_t first) {
  if (first >= 0) {
    const int64_t* run = values + first;
    for (int64_t c = 0; c < n; ++c) vr[c] &= static_cast<unsigned char>(run[c] == id);
  } else {
    for (int64_t c = 0; c < n; ++c) vr[c] = vr[c] && values[key[c]] == id;
  }
}

// vr[c] stays visible only where the key is not padded.
inline void keep_unpadded(unsigned char* vr, const bool* padded, const int64_t* key, int64_t n, int64_t first) {
  if (first >= 0) {
    const bool* run = padded + first;
    for (int64_t c = 0; c < n; ++c) vr[c] &= static_cast<unsigned char>(!run[c]);
  } else {
    for (int64_t c = 0; c < n; ++c) vr[c] = vr[c] && !padded[key[c]];
  }
}

// Row loops run over `width` columns: the group's n keys rounded up to kRowLanes, within the
// kKeyGroup-wide scratch rows. A scalar tail of the exp costs as much as three vector
// iterations (Swin's 49 keys leave one), so score() clears the visibility of the columns past
// n instead, and the loops compute those columns and select them away.
inline int64_t lane_width(int64_t n) {
  return std::min(kKeyGroup, (n + kRowLanes - 1) / kRowLanes * kRowLanes);
}

// p[c] = exp(s[c] − shift) where the pair is visible, else 0 (never exp(−inf)). Computed for
// every c and then selected, so the loop vectorizes; `omp simd` because the visibility bytes
// could alias the floats as far as the compiler knows.
template <typename acc_t>
void masked_exp(acc_t* p, const acc_t* s, const unsigned char* visible, acc_t shift, int64_t width) {
#pragma omp simd
  for (int64_t c = 0; c < width; ++c) {
    const acc_t e = exp_nonpositive(s[c] - shift);
    p[c] = visible[c] ? e : acc_t(0);
  }
}

// Row (bi, hi) of a (B, 1 or H, len) per-token tensor.
inline const int64_t* token_row(const int64_t* x, int64_t heads, int64_t bi, int64_t hi, int64_t len) {
  return x + (bi * heads + (heads == 1 ? 0 : hi)) * len;
}

// Sliding window + dilation + Longformer global tokens + key padding + segments.
struct WindowPattern {
  const WindowAttentionShape& s;
  const bool* global;   // (B, T) or null
  const bool* padding;  // (B, T_k) or null
  // (B, segment_heads, T_q / T_k) or null: a query sees only the keys of its own segment.
  const int64_t* q_segments;
  const int64_t* k_segments;
  int64_t segment_heads;
  std::vector<std::vector<int64_t>> global_keys;  // per batch, sorted

  template <typename acc_t>
  WindowPattern(const WindowAttentionShape& shape, const bool* global_mask, const bool* key_padding,
                const PairTerms<acc_t>& terms)
      : s(shape), global(global_mask), padding(key_padding), q_segments(terms.q_segments),
        k_segments(terms.k_segments), segment_heads(terms.segment_heads), global_keys(shape.batch) {
    if (global)
      for (int64_t b = 0; b < s.batch; ++b)
        for (int64_t j = 0; j < s.k_len; ++j)
          if (global[b * s.k_len + j]) global_keys[b].push_back(j);
  }

  // The key groups rows [i0, i1) of batch bi visit: their window's band, or every key when one
  // of them is global, plus the global keys outside the band.
  KeyGroups key_groups(int64_t bi, int64_t /*hi*/, int64_t i0, int64_t i1) const {
    KeyGroups kg;
    bool any_global_row = false;
    if (global)
      for (int64_t i = i0; i < i1; ++i) any_global_row |= global[bi * s.k_len + i];
    if (any_global_row) {
      kg.add_range(0, s.k_len);
      return kg;
    }
    const int64_t begin = s.band_begin(i0), end = std::max(begin, s.band_end(i1));
    kg.add_range(begin, end);
    if (global) {
      std::vector<int64_t> outside;
      for (int64_t j : global_keys[bi])
        if (j < begin || j >= end) outside.push_back(j);
      kg.add_list(outside);
    }
    return kg;
  }

  // vis (L × n, leading dim ld) for rows i0.. against `keys`: the window as an interval test per
  // row (a loop that vectorizes), then dilation, global tokens and padding only when they are in
  // use (the definition is at the top of kernel.h).
  void visibility(int64_t bi, int64_t hi, int64_t i0, int64_t L, const std::vector<int64_t>& keys,
                  unsigned char* vis, int64_t ld) const {
    const int64_t n = static_cast<int64_t>(keys.size());
    const int64_t* key = keys.data();
    const int64_t first = run_start(keys);
    const int64_t offset = s.k_len - s.q_len;
    const int64_t* qseg = q_segments ? token_row(q_segments, segment_heads, bi, hi, s.q_len) : nullptr;
    const int64_t* kseg = k_segments ? token_row(k_segments, segment_heads, bi, hi, s.k_len) : nullptr;
    for (int64_t r = 0; r < L; ++r) {
      const int64_t a = i0 + r + offset;  // the query's aligned key position
      const int64_t lo = s.left < 0 ? std::numeric_limits<int64_t>::min() : a - s.left;
      const int64_t hi = s.right < 0 ? std::numeric_limits<int64_t>::max() : a + s.right;
      unsigned char* vr = vis + r * ld;
      for (int64_t c = 0; c < n; ++c) vr[c] = key[c] >= lo && key[c] <= hi;
      if (s.dilation > 1)
        for (int64_t c = 0; c < n; ++c) vr[c] = vr[c] && (a - key[c]) % s.dilation == 0;
      if (global) {
        const bool* g = global + bi * s.k_len;
        const bool row_global = g[i0 + r];
        for (int64_t c = 0; c < n; ++c) vr[c] = vr[c] || row_global || g[key[c]];
      }
      if (padding) keep_unpadded(vr, padding + bi * s.k_len, key, n, first);
      if (qseg) keep_equal(vr, kseg, qseg[i0 + r], key, n, first);
    }
  }

  // No bias and no fixed scores in this family.
  template <typename acc_t>
  void adjust_scores(int64_t, int64_t, int64_t, int64_t, const std::vector<int64_t>&, acc_t*, unsigned char*,
                     int64_t) const {}
  template <typename acc_t>
  void add_bias_grad(int64_t, int64_t, int64_t, const std::vector<int64_t>&, const acc_t*, int64_t, acc_t*) const {}
};

// Block-sparse: key j is visible to query i when layout[h, i / b, j / b] (and j <= i + T_k − T_q
// when causal), unless padded, and, with the PairTerms of kernel.h, when their segment ids
// match (causal then compares positions). Layout (H or 1, ⌈T_q/b⌉, ⌈T_k/b⌉), contiguous.
// visibility() marks a pair 1, or 2 when adjust_scores fixes its score (a token's own key under
// shared QK): it is attended but passes no score gradient.
template <typename acc_t>
struct BlockPattern {
  const WindowAttentionShape& s;
  const BlockLayout& l;
  const PairTerms<acc_t>& t;
  const bool* padding;

  const bool* layout_row(int64_t hi, int64_t qb) const {
    return l.data + ((l.heads == 1 ? 0 : hi) * l.q_blocks + qb) * l.k_blocks;
  }
  // Every key block present in the layout row of any query block that rows [i0, i1) touch
  // (those wholly after the last row's position skipped when causal on indices).
  KeyGroups key_groups(int64_t /*bi*/, int64_t hi, int64_t i0, int64_t i1) const {
    std::vector<unsigned char> present(l.k_blocks, 0);
    for (int64_t qb = i0 / l.block; qb <= (i1 - 1) / l.block; ++qb) {
      const bool* row = layout_row(hi, qb);
      for (int64_t kb = 0; kb < l.k_blocks; ++kb) present[kb] |= row[kb];
    }
    const bool index_causal = l.causal && !t.positions;
    const int64_t last_key = index_causal ? i1 - 1 + (s.k_len - s.q_len) : s.k_len - 1;
    std::vector<int64_t> keys;
    for (int64_t kb = 0; kb < l.k_blocks; ++kb) {
      if (!present[kb]) continue;
      for (int64_t j = kb * l.block; j < std::min(s.k_len, (kb + 1) * l.block) && j <= last_key; ++j) keys.push_back(j);
    }
    KeyGroups kg;
    kg.add_list(keys);
    return kg;
  }

  void visibility(int64_t bi, int64_t hi, int64_t i0, int64_t L, const std::vector<int64_t>& keys,
                  unsigned char* vis, int64_t ld) const {
    const int64_t n = static_cast<int64_t>(keys.size());
    const int64_t* key = keys.data();
    const int64_t* pos = t.positions ? token_row(t.positions, t.position_heads, bi, hi, s.k_len) : nullptr;
    const int64_t* qseg = t.q_segments ? token_row(t.q_segments, t.segment_heads, bi, hi, s.q_len) : nullptr;
    const int64_t* kseg = t.k_segments ? token_row(t.k_segments, t.segment_heads, bi, hi, s.k_len) : nullptr;
    const int64_t first = run_start(keys);
    // The layout's verdict on each key, recomputed only when the query block changes (no
    // division per pair).
    std::vector<int64_t> key_block(n);
    for (int64_t c = 0; c < n; ++c) key_block[c] = key[c] / l.block;
    std::vector<unsigned char> in_layout(n);
    int64_t layout_block = -1;
    for (int64_t r = 0; r < L; ++r) {
      const int64_t i = i0 + r;
      if (i / l.block != layout_block) {
        layout_block = i / l.block;
        const bool* row = layout_row(hi, layout_block);
        for (int64_t c = 0; c < n; ++c) in_layout[c] = row[key_block[c]];
      }
      const unsigned char* lay = in_layout.data();
      unsigned char* vr = vis + r * ld;
      if (l.causal && pos) {
        const int64_t pi = pos[i];
        for (int64_t c = 0; c < n; ++c) vr[c] = lay[c] & (pos[key[c]] <= pi);
      } else if (l.causal) {
        const int64_t last = i + (s.k_len - s.q_len);
        for (int64_t c = 0; c < n; ++c) vr[c] = lay[c] & (key[c] <= last);
      } else {
        std::copy(lay, lay + n, vr);
      }
      if (qseg) keep_equal(vr, kseg, qseg[i], key, n, first);
      if (padding) keep_unpadded(vr, padding + bi * s.k_len, key, n, first);
    }
  }

  // scores += bias; a visible pair of a token with itself (equal positions) scores kSelfScore.
  void adjust_scores(int64_t bi, int64_t hi, int64_t i0, int64_t L, const std::vector<int64_t>& keys,
                     acc_t* scores, unsigned char* vis, int64_t ld) const {
    const int64_t n = static_cast<int64_t>(keys.size());
    const int64_t* key = keys.data();
    if (t.bias) {
      const acc_t* head_bias = t.bias + (t.bias_heads == 1 ? 0 : hi) * s.q_len * s.k_len;
      const int64_t first = run_start(keys);
      for (int64_t r = 0; r < L; ++r) {
        const acc_t* br = head_bias + (i0 + r) * s.k_len;
        acc_t* sr = scores + r * ld;
        if (first >= 0) {
          for (int64_t c = 0; c < n; ++c) sr[c] += br[first + c];
        } else {
          for (int64_t c = 0; c < n; ++c) sr[c] += br[key[c]];
        }
      }
    }
    if (t.positions) {
      const int64_t* pos = token_row(t.positions, t.position_heads, bi, hi, s.k_len);
      for (int64_t r = 0; r < L; ++r) {
        const int64_t pi = pos[i0 + r];
        for (int64_t c = 0; c < n; ++c)
          if (vis[r * ld + c] && pos[key[c]] == pi) {
            scores[r * ld + c] = static_cast<acc_t>(kSelfScore);
            vis[r * ld + c] = 2;
          }
      }
    }
  }

  // grad_bias (a thread's accumulator) += dS over the group's pairs.
  void add_bias_grad(int64_t hi, int64_t i0, int64_t L, const std::vector<int64_t>& keys, const acc_t* dS,
                     int64_t ld, acc_t* grad_bias) const {
    if (!t.bias) return;
    const int64_t n = static_cast<int64_t>(keys.size());
    acc_t* head_grad = grad_bias + (t.bias_heads == 1 ? 0 : hi) * s.q_len * s.k_len;
    const int64_t first = run_start(keys);
    for (int64_t r = 0; r < L; ++r) {
      acc_t* gr = head_grad + (i0 + r) * s.k_len;
      const acc_t* ds = dS + r * ld;
      if (first >= 0) {
        for (int64_t c = 0; c < n; ++c) gr[first + c] += ds[c];
      } else {
        for (int64_t c = 0; c < n; ++c) gr[keys[c]] += ds[c];
      }
    }
  }
};

// An engine's scratch rows. Each thread keeps one across calls (thread_local): allocating and
// zero-filling these ~300 KB on every call was most of the fixed cost of a small call (Swin's
// last stage: one window, 24 heads). Stale contents are harmless: every loop writes what it
// reads, except the columns past a group's keys, whose visibility score() clears.
template <typename acc_t>
struct EngineScratch {
  std::vector<acc_t> q, k, v, g, scores, probs, o, dq, dk_part, dv_part, row_max, row_sum, lse_rows, delta;
  std::vector<acc_t> slope;  // soft-capped calls only: d(capped score) / d(score) per pair
  std::vector<acc_t> key_positions;  // ALiBi and forget-gate calls only: a key group's positions
  std::vector<acc_t> key_forget;     // forget-gate calls only: a key group's cumulative log gates
  std::vector<acc_t> keep, dropped;  // dropout calls only: per pair 0 or 1 / (1 − p); P with it applied
  std::vector<uint32_t> dropout_words;  // dropout calls only: a run's Philox words, four per quad of keys
  std::vector<unsigned char> vis;
  bool in_use = false;

  void reserve_for(int64_t D, int64_t dv, bool soft_capped, bool with_alibi, bool with_forget, bool drops) {
    auto at_least = [](auto& buffer, int64_t size) {
      if (static_cast<int64_t>(buffer.size()) < size) buffer.resize(size);
    };
    at_least(q, kBlock * D);
    at_least(k, kKeyGroup * D);
    at_least(v, kKeyGroup * dv);
    at_least(g, kBlock * dv);
    at_least(scores, kBlock * kKeyGroup);
    at_least(probs, kBlock * kKeyGroup);
    at_least(o, kBlock * dv);
    at_least(dq, kBlock * D);
    at_least(dk_part, kKeyGroup * D);
    at_least(dv_part, kKeyGroup * dv);
    at_least(row_max, kBlock);
    at_least(row_sum, kBlock);
    at_least(lse_rows, kBlock);
    at_least(delta, kBlock);
    at_least(vis, kBlock * kKeyGroup);
    if (soft_capped) at_least(slope, kBlock * kKeyGroup);
    if (with_alibi || with_forget) at_least(key_positions, kKeyGroup);
    if (with_forget) at_least(key_forget, kKeyGroup);
    if (drops) {
      at_least(keep, kBlock * kKeyGroup);
      at_least(dropped, kBlock * kKeyGroup);
      at_least(dropout_words, kKeyGroup + 8);  // a run spans at most kKeyGroup / 4 + 2 quads
    }
  }
};

// This thread's scratch, or `own` when an engine of this thread already holds it.
template <typename acc_t>
EngineScratch<acc_t>& claim_scratch(EngineScratch<acc_t>& own) {
  static thread_local EngineScratch<acc_t> kept;
  EngineScratch<acc_t>& chosen = kept.in_use ? own : kept;
  chosen.in_use = true;
  return chosen;
}

// The flash-style engine, for any pattern with key_groups() and visibility().
// The Forgetting Transformer's gates of a call (PairTerms' forget_cumsum, nullable): the
// cumulative log forget gates (B, H, T_k) and their gradient's accumulator.
template <typename acc_t>
struct ForgetGates {
  const acc_t* cumsum = nullptr;
  acc_t* grad = nullptr;
};

template <typename scalar_t, typename acc_t, typename Pattern>
struct SoftmaxEngine {
  const WindowAttentionShape& s;
  const Pattern& pattern;
  const ForgetGates<acc_t> forget;
  int64_t D, dv;

  EngineScratch<acc_t> own;  // used only when this thread's kept scratch is taken
  EngineScratch<acc_t>& buffers;
  std::vector<acc_t>&q, &k, &v, &g, &scores, &probs, &o, &dq, &dk_part, &dv_part, &row_max, &row_sum, &lse_rows,
      &delta, &slope;
  std::vector<unsigned char>& vis;

  SoftmaxEngine(const WindowAttentionShape& shape, const Pattern& visible, ForgetGates<acc_t> gates)
      : s(shape), pattern(visible), forget(gates), D(shape.head_dim), dv(shape.value_dim), buffers(claim_scratch(own)),
        q(buffers.q), k(buffers.k), v(buffers.v), g(buffers.g), scores(buffers.scores), probs(buffers.probs),
        o(buffers.o), dq(buffers.dq), dk_part(buffers.dk_part), dv_part(buffers.dv_part), row_max(buffers.row_max),
        row_sum(buffers.row_sum), lse_rows(buffers.lse_rows), delta(buffers.delta), slope(buffers.slope),
        vis(buffers.vis) {
    buffers.reserve_for(D, dv, shape.softcap > 0, shape.alibi != nullptr, gates.cumsum != nullptr, shape.drops());
  }
  ~SoftmaxEngine() { buffers.in_use = false; }
  SoftmaxEngine(const SoftmaxEngine&) = delete;
  SoftmaxEngine& operator=(const SoftmaxEngine&) = delete;

  // Rows of a (b, h) view gathered by index into contiguous scratch, one load per run of
  // consecutive indices (a window band is a single run).
  template <typename Dst>
  void gather(Dst& dst, int64_t width, const Strided4<const scalar_t>& x, int64_t bi, int64_t hi,
              const std::vector<int64_t>& rows) {
    const int64_t n = static_cast<int64_t>(rows.size());
    for (int64_t r0 = 0; r0 < n;) {
      int64_t r1 = r0 + 1;
      while (r1 < n && rows[r1] == rows[r1 - 1] + 1) ++r1;
      load_rows(dst.data() + r0 * width, width, x.row(bi, hi, rows[r0]), x.stride[2], x.stride[3], r1 - r0, width);
      r0 = r1;
    }
  }

  void load_queries(const Strided4<const scalar_t>& Q, int64_t bi, int64_t hi, int64_t i0, int64_t L) {
    load_rows(q.data(), D, Q.row(bi, hi, i0), Q.stride[2], Q.stride[3], L, D);
    const acc_t scale = static_cast<acc_t>(s.scale);
    for (int64_t x = 0; x < L * D; ++x) q[x] *= scale;
  }

  // scores = q kᵀ for the group (soft-capped), and the visibility of each pair.
  void score(int64_t bi, int64_t hi, int64_t i0, int64_t L, const std::vector<int64_t>& keys) {
    const int64_t n = static_cast<int64_t>(keys.size());
    const int64_t width = lane_width(n);  // the row loops' columns past n: never visible
    gemm<acc_t>(false, true, L, n, D, q.data(), D, k.data(), D, 0, scores.data(), kKeyGroup);
    if (s.softcap > 0) soft_cap(L, width);
    if (s.alibi != nullptr) add_alibi(bi, hi, i0, L, keys);
    if (forget.cumsum != nullptr) add_forget(bi, hi, i0, L, keys);
    pattern.visibility(bi, hi, i0, L, keys, vis.data(), kKeyGroup);
    pattern.adjust_scores(bi, hi, i0, L, keys, scores.data(), vis.data(), kKeyGroup);
    for (int64_t r = 0; r < L; ++r) std::fill(vis.data() + r * kKeyGroup + n, vis.data() + r * kKeyGroup + width, 0);
  }

  // ALiBi: scores −= slope · |a − j|, a = i + T_k − T_q the query's aligned position (after the
  // cap, before the pattern's bias, as flash-attn adds it).
  void add_alibi(int64_t bi, int64_t hi, int64_t i0, int64_t L, const std::vector<int64_t>& keys) {
    const acc_t slope = static_cast<acc_t>(s.alibi[bi * s.alibi_batch_stride + hi]);
    const int64_t n = static_cast<int64_t>(keys.size()), first = run_start(keys);
    // The group's key positions once, in acc_t (exact: positions are far below 2^24), so that the
    // per-row loop is a vector subtract, abs and multiply-add.
    acc_t* key_at = buffers.key_positions.data();  // kKeyGroup entries (reserve_for)
    for (int64_t c = 0; c < n; ++c) key_at[c] = static_cast<acc_t>(first >= 0 ? first + c : keys[c]);
    for (int64_t r = 0; r < L; ++r) {
      const acc_t a = static_cast<acc_t>(i0 + r + (s.k_len - s.q_len));
      acc_t* sr = scores.data() + r * kKeyGroup;
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) sr[c] -= slope * std::abs(a - key_at[c]);
    }
  }

  // The forget gates' decay (after the cap and ALiBi, before the pattern's bias): scores += c_a − c_j
  // for keys j <= a, c_j − c_a past a (a = i + T_k − T_q; c the head's cumulative log gates). Leaves
  // the group's positions and gates in key_positions and key_forget, for the backward's gradient.
  void add_forget(int64_t bi, int64_t hi, int64_t i0, int64_t L, const std::vector<int64_t>& keys) {
    const acc_t* c = forget.cumsum + (bi * s.heads + hi) * s.k_len;
    const int64_t n = static_cast<int64_t>(keys.size()), first = run_start(keys);
    acc_t* key_at = buffers.key_positions.data();
    acc_t* key_c = buffers.key_forget.data();
    for (int64_t x = 0; x < n; ++x) {
      const int64_t j = first >= 0 ? first + x : keys[x];
      key_at[x] = static_cast<acc_t>(j);
      key_c[x] = c[j];
    }
    for (int64_t r = 0; r < L; ++r) {
      const int64_t a = i0 + r + (s.k_len - s.q_len);
      const acc_t position = static_cast<acc_t>(a), ca = c[a];
      acc_t* sr = scores.data() + r * kKeyGroup;
#pragma omp simd
      for (int64_t x = 0; x < n; ++x) {
        const acc_t d = ca - key_c[x];
        sr[x] += key_at[x] <= position ? d : -d;
      }
    }
  }

  // Their gradient from the group's score gradients dS (0 on hidden pairs): each pair's signed dS
  // joins its query's position a and leaves its key's.
  void add_forget_grad(int64_t bi, int64_t hi, int64_t i0, int64_t L, const std::vector<int64_t>& keys,
                       const acc_t* dS) const {
    acc_t* grad = forget.grad + (bi * s.heads + hi) * s.k_len;
    const int64_t n = static_cast<int64_t>(keys.size()), first = run_start(keys);
    const acc_t* key_at = buffers.key_positions.data();
    for (int64_t r = 0; r < L; ++r) {
      const int64_t a = i0 + r + (s.k_len - s.q_len);
      const acc_t position = static_cast<acc_t>(a);
      const acc_t* ds = dS + r * kKeyGroup;
      acc_t row = 0;
      if (first >= 0) {
        acc_t* gk = grad + first;
#pragma omp simd reduction(+ : row)
        for (int64_t x = 0; x < n; ++x) {
          const acc_t signed_ds = key_at[x] <= position ? ds[x] : -ds[x];
          row += signed_ds;
          gk[x] -= signed_ds;
        }
      } else {
        for (int64_t x = 0; x < n; ++x) {
          const acc_t signed_ds = key_at[x] <= position ? ds[x] : -ds[x];
          row += signed_ds;
          grad[keys[x]] -= signed_ds;
        }
      }
      grad[a] += row;
    }
  }

  // Attention dropout's factor of each pair of the group: 1 / (1 − p) where the pair's Philox bits
  // keep it, else 0 (common/philox.h; the columns past the group's keys: 0).
  void dropout_factors(int64_t bh, int64_t i0, int64_t L, const std::vector<int64_t>& keys) {
    const int64_t n = static_cast<int64_t>(keys.size()), width = lane_width(n), first = run_start(keys);
    const uint64_t seed = s.dropout_seed;
    const uint32_t threshold = s.dropout_threshold;
    const acc_t scale = static_cast<acc_t>(s.dropout_scale);
    auto factor = [&](uint32_t bits) { return bits >= threshold ? scale : acc_t(0); };
    for (int64_t r = 0; r < L; ++r) {
      acc_t* kr = buffers.keep.data() + r * kKeyGroup;
      const int64_t i = i0 + r;
      if (first >= 0) {
        // A run of keys: one Philox evaluation serves the four keys of an aligned quad (its four
        // words; dropout_bits' definition), the quads' evaluations vectorized.
        const int64_t quad0 = first >> 2, quads = ((first + n - 1) >> 2) - quad0 + 1;
        uint32_t* bits = buffers.dropout_words.data();
#pragma omp simd
        for (int64_t t = 0; t < quads; ++t) {
          const Philox4 w = dropout_quad(seed, bh, i, quad0 + t);
          bits[4 * t] = w.x[0];
          bits[4 * t + 1] = w.x[1];
          bits[4 * t + 2] = w.x[2];
          bits[4 * t + 3] = w.x[3];
        }
        const int64_t skip = first & 3;  // words of the first quad before the run
#pragma omp simd
        for (int64_t c = 0; c < n; ++c) kr[c] = factor(bits[skip + c]);
      } else {
#pragma omp simd
        for (int64_t c = 0; c < n; ++c) kr[c] = factor(dropout_bits(seed, bh, i, keys[c]));
      }
      std::fill(kr + n, kr + width, acc_t(0));
    }
  }

  // Logit soft-capping (Gemma-2): s ← c·tanh(s / c), before the pattern's bias; `slope` keeps
  // 1 − tanh², the factor a score gradient passes through (the columns past the group's keys
  // hold stale scores: capped all the same, never visible).
  void soft_cap(int64_t L, int64_t width) {
    const acc_t cap = static_cast<acc_t>(s.softcap), inverse = acc_t(1) / cap;
    for (int64_t r = 0; r < L; ++r) {
      acc_t* sr = scores.data() + r * kKeyGroup;
      acc_t* dr = slope.data() + r * kKeyGroup;
#pragma omp simd
      for (int64_t c = 0; c < width; ++c) {
        const acc_t t = tanh_of(sr[c] * inverse);
        sr[c] = cap * t;
        dr[c] = acc_t(1) - t * t;
      }
    }
  }

  // A key group's keys and values into scratch, its scores and visibility; returns its size.
  int64_t load_group(const Strided4<const scalar_t>& K, const Strided4<const scalar_t>& V, int64_t bi,
                     int64_t hi, int64_t i0, int64_t L, const std::vector<int64_t>& keys) {
    gather(k, D, K, bi, s.kv_head(hi), keys);
    gather(v, dv, V, bi, s.kv_head(hi), keys);
    score(bi, hi, i0, L, keys);
    return static_cast<int64_t>(keys.size());
  }

  auto visible_pair() const {
    return [this](int64_t r, int64_t c) { return vis[r * kKeyGroup + c] != 0; };
  }

  void forward_block(int64_t bh, int64_t i0, Strided4<const scalar_t> Q, Strided4<const scalar_t> K,
                     Strided4<const scalar_t> V, scalar_t* out, acc_t* lse) {
    const int64_t bi = bh / s.heads, hi = bh % s.heads;
    const int64_t L = std::min(kBlock, s.q_len - i0);
    load_queries(Q, bi, hi, i0, L);
    std::fill(o.begin(), o.begin() + L * dv, acc_t(0));
    std::fill(row_max.begin(), row_max.end(), minus_infinity<acc_t>());
    std::fill(row_sum.begin(), row_sum.end(), acc_t(0));
    for (const auto& keys : pattern.key_groups(bi, hi, i0, i0 + L).groups) {
      const int64_t n = load_group(K, V, bi, hi, i0, L, keys), width = lane_width(n);
      if (s.drops()) dropout_factors(bh, i0, L, keys);
      for (int64_t r = 0; r < L; ++r) {
        const acc_t* sr = scores.data() + r * kKeyGroup;
        const unsigned char* vr = vis.data() + r * kKeyGroup;
        acc_t* pr = probs.data() + r * kKeyGroup;
        bool any_visible;
        const acc_t group_max = masked_row_max(sr, vr, width, any_visible);
        if (!any_visible) {
          std::fill(pr, pr + n, acc_t(0));
          continue;
        }
        const acc_t m_old = row_max[r];
        const acc_t m_new = std::max(m_old, group_max);
        // All visible scores NaN leave m at −inf: exp(NaN − −inf) is NaN, which then propagates.
        const acc_t alpha = m_old == minus_infinity<acc_t>() ? acc_t(0) : exp_nonpositive(m_old - m_new);
        masked_exp(pr, sr, vr, m_new, width);
        row_sum[r] = row_sum[r] * alpha + row_total(pr, width);
        if (s.drops()) {  // dropped after the softmax's sum: the output, not the normalizer
          const acc_t* kr = buffers.keep.data() + r * kKeyGroup;
#pragma omp simd
          for (int64_t c = 0; c < width; ++c) pr[c] *= kr[c];
        }
        row_max[r] = m_new;
        acc_t* orow = o.data() + r * dv;
        for (int64_t c = 0; c < dv; ++c) orow[c] *= alpha;
      }
      add_masked_product(false, L, n, dv, probs.data(), kKeyGroup, v.data(), dv, o.data(), dv, visible_pair());
    }
    scalar_t* out_rows = out + (bh * s.q_len + i0) * dv;
    for (int64_t r = 0; r < L; ++r) {
      const acc_t l = row_sum[r];
      const acc_t inv = l == acc_t(0) ? acc_t(0) : acc_t(1) / l;
      for (int64_t c = 0; c < dv; ++c) out_rows[r * dv + c] = static_cast<scalar_t>(o[r * dv + c] * inv);
      lse[bh * s.q_len + i0 + r] = l == acc_t(0) ? minus_infinity<acc_t>() : row_max[r] + std::log(l);
    }
  }

  // The gradients of query heads [bh, bh + count) (batch · H indexing; grouped-query heads of
  // one shared key/value head): their dq, and their dk, dv summed in head order into the
  // accumulators (k_len rows each, zeroed by the caller).
  void backward_heads(int64_t bh, int64_t count, Strided4<const scalar_t> G, Strided4<const scalar_t> Q,
                      Strided4<const scalar_t> K, Strided4<const scalar_t> V, Strided4<const scalar_t> O,
                      const acc_t* lse, const acc_t* grad_lse, scalar_t* grad_q, acc_t* dk_acc, acc_t* dv_acc,
                      acc_t* grad_bias) {
    for (int64_t head = bh; head < bh + count; ++head)
      backward_head(head, G, Q, K, V, O, lse, grad_lse, grad_q, dk_acc, dv_acc, grad_bias);
  }

  // One query head's part: its dq, and its terms of dk, dv added to the accumulators. grad_lse
  // (nullable) is the cotangent of lse: it enters as δ_i − grad_lse_i. grad_bias is this thread's
  // bias-gradient accumulator (null without a bias).
  void backward_head(int64_t bh, Strided4<const scalar_t> G, Strided4<const scalar_t> Q,
                     Strided4<const scalar_t> K, Strided4<const scalar_t> V, Strided4<const scalar_t> O,
                     const acc_t* lse, const acc_t* grad_lse, scalar_t* grad_q, acc_t* dk_acc, acc_t* dv_acc,
                     acc_t* grad_bias) {
    const int64_t bi = bh / s.heads, hi = bh % s.heads;
    const acc_t scale = static_cast<acc_t>(s.scale);
    for (int64_t i0 = 0; i0 < s.q_len; i0 += kBlock) {
      const int64_t L = std::min(kBlock, s.q_len - i0);
      load_queries(Q, bi, hi, i0, L);
      load_rows(g.data(), dv, G.row(bi, hi, i0), G.stride[2], G.stride[3], L, dv);
      // δ_i = dO_i · O_i; a zero cotangent contributes nothing (not 0·O, NaN for NaN O). The
      // outputs' rows go through the o scratch (contiguous, accumulation type).
      load_rows(o.data(), dv, O.row(bi, hi, i0), O.stride[2], O.stride[3], L, dv);
      for (int64_t r = 0; r < L; ++r) {
        const acc_t dot = dot_where_nonzero(g.data() + r * dv, o.data() + r * dv, dv);
        delta[r] = grad_lse ? dot - grad_lse[bh * s.q_len + i0 + r] : dot;
        lse_rows[r] = lse[bh * s.q_len + i0 + r];
      }
      std::fill(dq.begin(), dq.begin() + L * D, acc_t(0));
      for (const auto& keys : pattern.key_groups(bi, hi, i0, i0 + L).groups) {
        const int64_t n = load_group(K, V, bi, hi, i0, L, keys), width = lane_width(n);
        for (int64_t r = 0; r < L; ++r) {
          const bool empty = lse_rows[r] == minus_infinity<acc_t>();
          unsigned char* vr = vis.data() + r * kKeyGroup;
          if (empty) std::fill(vr, vr + width, 0);
          const acc_t* sr = scores.data() + r * kKeyGroup;
          acc_t* pr = probs.data() + r * kKeyGroup;
          const acc_t row_lse = lse_rows[r];
          masked_exp(pr, sr, vr, row_lse, width);
        }
        // Key and value gradients of a run of consecutive keys accumulate in place; other groups
        // go through the parts, scattered below.
        const int64_t first = run_start(keys);
        acc_t* dv_keys = first >= 0 ? dv_acc + first * dv : dv_part.data();
        acc_t* dk_keys = first >= 0 ? dk_acc + first * D : dk_part.data();
        if (first < 0) {
          std::fill(dv_part.begin(), dv_part.begin() + n * dv, acc_t(0));
          std::fill(dk_part.begin(), dk_part.begin() + n * D, acc_t(0));
        }
        // dV_keys += Pᵀ dO (with dropout, the dropped P the forward multiplied V by)
        const acc_t* p_applied = probs.data();
        if (s.drops()) {
          dropout_factors(bh, i0, L, keys);
          acc_t* pd = buffers.dropped.data();
          const acc_t* kept = buffers.keep.data();
#pragma omp simd
          for (int64_t x = 0; x < L * kKeyGroup; ++x) pd[x] = probs[x] * kept[x];
          p_applied = pd;
        }
        add_masked_product(true, L, n, dv, p_applied, kKeyGroup, g.data(), dv, dv_keys, dv, visible_pair());
        // dP = dO Vᵀ (times the dropout factors: the gradient of the undropped P), then
        // dS = P ⊙ (dP − δ) on visible pairs whose score is not fixed (scores is reused for dS).
        gemm<acc_t>(false, true, L, n, dv, g.data(), dv, v.data(), dv, 0, scores.data(), kKeyGroup);
        if (s.drops())
          for (int64_t r = 0; r < L; ++r) {
            acc_t* dsr = scores.data() + r * kKeyGroup;
            const acc_t* kr = buffers.keep.data() + r * kKeyGroup;
#pragma omp simd
            for (int64_t c = 0; c < width; ++c) dsr[c] *= kr[c];
          }
        for (int64_t r = 0; r < L; ++r) {
          acc_t* dsr = scores.data() + r * kKeyGroup;
          const acc_t* pr = probs.data() + r * kKeyGroup;
          const unsigned char* vr = vis.data() + r * kKeyGroup;
          const acc_t d = delta[r];
#pragma omp simd
          for (int64_t c = 0; c < width; ++c) dsr[c] = vr[c] == 1 ? pr[c] * (dsr[c] - d) : acc_t(0);
        }
        if (grad_bias) pattern.add_bias_grad(hi, i0, L, keys, scores.data(), kKeyGroup, grad_bias);
        if (forget.grad) add_forget_grad(bi, hi, i0, L, keys, scores.data());
        // The capped score's gradient (the bias's, added after capping) times the cap's slope is
        // the raw score's; selected, so that a hidden pair's slope (NaN from a NaN score) stays out.
        if (s.softcap > 0)
          for (int64_t r = 0; r < L; ++r) {
            acc_t* dsr = scores.data() + r * kKeyGroup;
            const acc_t* sl = slope.data() + r * kKeyGroup;
            const unsigned char* vr = vis.data() + r * kKeyGroup;
#pragma omp simd
            for (int64_t c = 0; c < width; ++c) dsr[c] = vr[c] == 1 ? dsr[c] * sl[c] : acc_t(0);
          }
        // dQ += dS K (scaled at the end), dK_keys += dSᵀ (scale·Q)
        add_masked_product(false, L, n, D, scores.data(), kKeyGroup, k.data(), D, dq.data(), D, visible_pair());
        add_masked_product(true, L, n, D, scores.data(), kKeyGroup, q.data(), D, dk_keys, D, visible_pair());
        if (first < 0)
          for (int64_t c = 0; c < n; ++c) {
            acc_t* dkr = dk_acc + keys[c] * D;
            acc_t* dvr = dv_acc + keys[c] * dv;
            for (int64_t x = 0; x < D; ++x) dkr[x] += dk_part[c * D + x];
            for (int64_t x = 0; x < dv; ++x) dvr[x] += dv_part[c * dv + x];
          }
      }
      scalar_t* dq_rows = grad_q + (bh * s.q_len + i0) * D;
      for (int64_t x = 0; x < L * D; ++x) dq_rows[x] = static_cast<scalar_t>(dq[x] * scale);
    }
  }
};

template <typename scalar_t, typename acc_t, typename Pattern>
void run_forward(const WindowAttentionShape& shape, const Pattern& pattern, const PairTerms<acc_t>& terms,
                 Strided4<const scalar_t> q, Strided4<const scalar_t> k, Strided4<const scalar_t> v, scalar_t* out,
                 acc_t* lse) {
  const int64_t blocks = (shape.q_len + kBlock - 1) / kBlock;
  // Rows are independent in the forward: (batch·head, query block) pairs are the work items,
  // so one long sequence still keeps every thread busy.
  at::parallel_for(0, shape.batch * shape.heads * blocks, 1, [&](int64_t begin, int64_t end) {
    SoftmaxEngine<scalar_t, acc_t, Pattern> engine(shape, pattern, {terms.forget_cumsum, nullptr});
    for (int64_t item = begin; item < end; ++item)
      engine.forward_block(item / blocks, (item % blocks) * kBlock, q, k, v, out, lse);
  });
}

// grad_bias (bias_size entries, zeroed; null without a bias) receives the sum over (batch, head)
// of each one's bias gradient: every parallel chunk accumulates its own, and the chunks are
// added in order, so the result does not depend on thread timing. The forget gates' gradient
// (terms.grad_forget_cumsum, zeroed) has a row per query head, which one work item writes.
template <typename scalar_t, typename acc_t, typename Pattern>
void run_backward(const WindowAttentionShape& shape, const Pattern& pattern, const PairTerms<acc_t>& terms,
                  Strided4<const scalar_t> grad_out,
                  const acc_t* grad_lse, Strided4<const scalar_t> q, Strided4<const scalar_t> k,
                  Strided4<const scalar_t> v, Strided4<const scalar_t> out, const acc_t* lse, scalar_t* grad_q,
                  scalar_t* grad_k, scalar_t* grad_v, acc_t* grad_bias = nullptr, int64_t bias_size = 0) {
  // Key and value gradients gather contributions from every query block of every query head that
  // reads them. Work items: one per (batch, key/value head), its query heads run in turn into one
  // accumulator; or, with grouped-query heads too few to keep the threads busy (one sequence, few
  // shared heads), one per query head, each into fp32 partials that are summed per shared head
  // after, in head order.
  const int64_t group = shape.kv_group, k_len = shape.k_len, D = shape.head_dim, dv = shape.value_dim;
  const bool per_query_head = group > 1 && shape.batch * shape.kv_heads() < at::get_num_threads();
  const int64_t unit = per_query_head ? 1 : group, items = shape.batch * shape.heads / std::max<int64_t>(unit, 1);
  std::vector<acc_t> partial_k(per_query_head ? items * k_len * D : 0);
  std::vector<acc_t> partial_v(per_query_head ? items * k_len * dv : 0);
  std::vector<std::vector<acc_t>> chunk_bias_grads(grad_bias ? items : 0);
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    SoftmaxEngine<scalar_t, acc_t, Pattern> engine(shape, pattern, {terms.forget_cumsum, terms.grad_forget_cumsum});
    std::vector<acc_t> dk_acc, dv_acc;
    // The first chunk adds straight into grad_bias (zeroed): the same sums in the same order.
    acc_t* bias_acc = nullptr;
    if (grad_bias && begin == 0) {
      bias_acc = grad_bias;
    } else if (grad_bias) {
      chunk_bias_grads[begin].assign(bias_size, acc_t(0));
      bias_acc = chunk_bias_grads[begin].data();
    }
    for (int64_t item = begin; item < end; ++item) {
      acc_t *dk_item = nullptr, *dv_item = nullptr;
      if (per_query_head) {  // zeroed at allocation
        dk_item = partial_k.data() + item * k_len * D;
        dv_item = partial_v.data() + item * k_len * dv;
      } else {
        dk_acc.assign(k_len * D, acc_t(0));
        dv_acc.assign(k_len * dv, acc_t(0));
        dk_item = dk_acc.data();
        dv_item = dv_acc.data();
      }
      engine.backward_heads(item * unit, unit, grad_out, q, k, v, out, lse, grad_lse, grad_q, dk_item, dv_item,
                            bias_acc);
      if (!per_query_head) {  // item is the shared head's (batch · H_kv) index
        for (int64_t x = 0; x < k_len * D; ++x) grad_k[item * k_len * D + x] = static_cast<scalar_t>(dk_item[x]);
        for (int64_t x = 0; x < k_len * dv; ++x) grad_v[item * k_len * dv + x] = static_cast<scalar_t>(dv_item[x]);
      }
    }
  });
  if (per_query_head) {
    auto fold = [&](const std::vector<acc_t>& partial, scalar_t* grad, int64_t width) {
      const int64_t rows = k_len * width;
      at::parallel_for(0, shape.batch * shape.kv_heads(), 1, [&](int64_t begin, int64_t end) {
        for (int64_t bkv = begin; bkv < end; ++bkv)
          for (int64_t x = 0; x < rows; ++x) {
            acc_t sum = partial[bkv * group * rows + x];
            for (int64_t j = 1; j < group; ++j) sum += partial[(bkv * group + j) * rows + x];
            grad[bkv * rows + x] = static_cast<scalar_t>(sum);
          }
      });
    };
    fold(partial_k, grad_k, D);
    fold(partial_v, grad_v, dv);
  }
  for (const auto& chunk : chunk_bias_grads)
    for (int64_t x = 0; x < static_cast<int64_t>(chunk.size()); ++x) grad_bias[x] += chunk[x];
}

}  // namespace

template <typename scalar_t, typename acc_t>
void window_attention_forward_cpu(const WindowAttentionShape& shape, Strided4<const scalar_t> q,
                                  Strided4<const scalar_t> k, Strided4<const scalar_t> v,
                                  const bool* global_mask, const bool* key_padding_mask,
                                  const PairTerms<acc_t>& terms, scalar_t* out, acc_t* lse) {
  run_forward(shape, WindowPattern(shape, global_mask, key_padding_mask, terms), terms, q, k, v, out, lse);
}

template <typename scalar_t, typename acc_t>
void window_attention_backward_cpu(const WindowAttentionShape& shape,
                                   Strided4<const scalar_t> grad_out, const acc_t* grad_lse, Strided4<const scalar_t> q,
                                   Strided4<const scalar_t> k, Strided4<const scalar_t> v,
                                   Strided4<const scalar_t> out, const acc_t* lse,
                                   const bool* global_mask, const bool* key_padding_mask,
                                   const PairTerms<acc_t>& terms, scalar_t* grad_q, scalar_t* grad_k,
                                   scalar_t* grad_v) {
  run_backward(shape, WindowPattern(shape, global_mask, key_padding_mask, terms), terms, grad_out, grad_lse,
               q, k, v, out, lse, grad_q, grad_k, grad_v);
}

template <typename scalar_t, typename acc_t>
void block_sparse_attention_forward_cpu(const WindowAttentionShape& shape, const BlockLayout& layout,
                                        const PairTerms<acc_t>& terms, Strided4<const scalar_t> q,
                                        Strided4<const scalar_t> k, Strided4<const scalar_t> v,
                                        const bool* key_padding_mask, scalar_t* out, acc_t* lse) {
  run_forward(shape, BlockPattern<acc_t>{shape, layout, terms, key_padding_mask}, terms, q, k, v, out, lse);
}

template <typename scalar_t, typename acc_t>
void block_sparse_attention_backward_cpu(const WindowAttentionShape& shape, const BlockLayout& layout,
                                         const PairTerms<acc_t>& terms, Strided4<const scalar_t> grad_out,
                                         const acc_t* grad_lse, Strided4<const scalar_t> q,
                                         Strided4<const scalar_t> k, Strided4<const scalar_t> v,
                                         Strided4<const scalar_t> out, const acc_t* lse,
                                         const bool* key_padding_mask, scalar_t* grad_q,
                                         scalar_t* grad_k, scalar_t* grad_v) {
  const int64_t bias_size = terms.bias ? terms.bias_heads * shape.q_len * shape.k_len : 0;
  run_backward(shape, BlockPattern<acc_t>{shape, layout, terms, key_padding_mask}, terms, grad_out, grad_lse, q, k, v,
               out, lse, grad_q, grad_k, grad_v, terms.bias ? terms.grad_bias : nullptr, bias_size);
}

#define LINATTN_INSTANTIATE(scalar_t, acc_t)                                                      \
  template void window_attention_forward_cpu<scalar_t, acc_t>(                                    \
      const WindowAttentionShape&, Strided4<const scalar_t>, Strided4<const scalar_t>,            \
      Strided4<const scalar_t>, const bool*, const bool*, const PairTerms<acc_t>&, scalar_t*, acc_t*); \
  template void window_attention_backward_cpu<scalar_t, acc_t>(                                   \
      const WindowAttentionShape&, Strided4<const scalar_t>, const acc_t*, Strided4<const scalar_t>, \
      Strided4<const scalar_t>, Strided4<const scalar_t>, Strided4<const scalar_t>, const acc_t*, \
      const bool*, const bool*, const PairTerms<acc_t>&, scalar_t*, scalar_t*, scalar_t*);         \
  template void block_sparse_attention_forward_cpu<scalar_t, acc_t>(                              \
      const WindowAttentionShape&, const BlockLayout&, const PairTerms<acc_t>&,                   \
      Strided4<const scalar_t>, Strided4<const scalar_t>, Strided4<const scalar_t>, const bool*,  \
      scalar_t*, acc_t*);                                                                         \
  template void block_sparse_attention_backward_cpu<scalar_t, acc_t>(                             \
      const WindowAttentionShape&, const BlockLayout&, const PairTerms<acc_t>&,                   \
      Strided4<const scalar_t>, const acc_t*, Strided4<const scalar_t>, Strided4<const scalar_t>, \
      Strided4<const scalar_t>, Strided4<const scalar_t>, const acc_t*, const bool*, scalar_t*,   \
      scalar_t*, scalar_t*);

LINATTN_INSTANTIATE(float, float)
LINATTN_INSTANTIATE(double, double)
LINATTN_INSTANTIATE(c10::Half, float)
LINATTN_INSTANTIATE(c10::BFloat16, float)
#undef LINATTN_INSTANTIATE

}  // namespace LINATTN_ISA
}  // namespace linattn
