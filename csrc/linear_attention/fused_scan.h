// The block program of the fused (CUDA) linear attention kernels, written once for the GPU and
// the CPU: `run_scan_block` is a sequence of phases, each run by every thread of a block and
// followed by a barrier. A CUDA kernel runs it with the phases on its threads and
// __syncthreads() between them (fused_cuda_kernels.cu); the CPU runs the very same program with
// the threads of a block emulated one after another (fused_emulated.cpp), so that a machine
// without a GPU tests every index, mask, tile and chunk boundary of the kernels. Everything that
// lives from one phase to the next is in the block's shared memory, never in a thread's
// registers, which is what makes the emulation exact.
//
// One engine serves the forward and the three backward passes, because each is the same scan
// (generic.cpp's causal_scan) with other operands:
//   out_i[t] = P_i · St[:, t] + Σ_{j visible from i} (P_i · K_j) V_j[t],  then St += Σ_j K_j V_jᵀ
// over chunks of rows, forwards (j <= i) or backwards (j >= i) in time; non-causal ("full")
// accumulates St over every row first and then gives out_i = P_i · St. A block owns one
// (batch, head) and one tile of V's columns, so its state tile St (a × tile) stays on chip from
// the first chunk to the last and no chunk state goes to memory.
//   forward     P = φ(q)   K = φ(k)   V = [v | 1]  St = [S | z]        out: o' → out, normalizer
//   grad q      P = G'     K = [v | 1] V = φ(k)    St = S0ᵀ (forward)  out: dq
//   grad k      P = [v | 1] K = G'    V = φ(q)     St = dS_Nᵀ (reverse) out: dk
//   grad v, S0  P = φ(k)   K = φ(q)   V = G'       St = dS_N (reverse)  out: dv; final St = dS0
// G' is the cotangent of the augmented output o' = [numerator | normalizer] (generic.cpp).
// The augmented column of V ([v | 1]'s ones, G''s normalizer column) rides along as an extra
// column in every tile, so each block can normalize its own output rows.
#pragma once

#include "../common/host_device.h"
#include "../common/strided.h"
#include "feature_map.h"

#include <cmath>
#include <cstdint>

namespace linattn {
namespace fused {

// Threads per block: the CUDA launch and the CPU emulation alike.
constexpr int64_t kThreads = 256;

// Which rows a scan operand reads. Query-side rows number T_q, key-side rows T_k.
enum class Rows : int {
  kQueryFeatures = 0,      // φ(q_i)
  kKeyFeatures = 1,        // φ(k_j), 0 for a padded key
  kAugmentedValues = 2,    // [v_j | 1], all 0 for a padded key
  kAugmentedCotangent = 3  // G'_i: the cotangent of [numerator | normalizer]
};

// What a block does with its output rows.
enum class Epilogue : int {
  kOutput = 0,     // out = numerator / normalizer (or the numerator), normalizer saved
  kGradQuery = 1,  // dq = o' · φ'(q)
  kGradKey = 2,    // dk = o' · φ'(k), 0 for a padded key
  kGradValue = 3   // dv = o' (without the augmented column), 0 for a padded key
};

template <typename acc_t>
struct Limits;
template <>
struct Limits<float> {
  static constexpr float min_normal = 1.17549435e-38f;
};
template <>
struct Limits<double> {
  static constexpr double min_normal = 2.2250738585072014e-308;
};

LINATTN_HD inline float exp_of(float x) { return ::expf(x); }
LINATTN_HD inline double exp_of(double x) { return ::exp(x); }

// A normalizer that is 0 or subnormal: the row is defined as 0 and passes no gradient (as in the
// CPU kernel and generic.cpp). NaN is not vanished.
template <typename acc_t>
LINATTN_HD bool vanished(acc_t d) {
  return (d < acc_t(0) ? -d : d) < Limits<acc_t>::min_normal;
}

// 1 / d, or 0 where d vanished (the row's outputs then are 0, or NaN where they see Inf or NaN).
template <typename acc_t>
LINATTN_HD acc_t inverse_unless_vanished(acc_t d) {
  return vanished(d) ? acc_t(0) : acc_t(1) / d;
}

// φ(x) and φ'(x). elu+1 is x + 1 for x > 0 and exp(x) otherwise (exactly, not expm1(x) + 1).
template <typename acc_t>
LINATTN_HD acc_t feature(int map, acc_t x) {
  if (map == kFeatureElu) return x > acc_t(0) ? x + acc_t(1) : exp_of(x);
  if (map == kFeatureRelu) return x < acc_t(0) ? acc_t(0) : x;  // NaN stays NaN
  return x;
}
template <typename acc_t>
LINATTN_HD acc_t feature_derivative(int map, acc_t x) {
  if (map == kFeatureElu) return x > acc_t(0) ? acc_t(1) : exp_of(x);
  if (map == kFeatureRelu) return x > acc_t(0) ? acc_t(1) : acc_t(0);
  return acc_t(1);
}

// A state tile's home in memory: element (r, c) of (batch, head) bh at
// data + bh·bh_stride + r·row_stride + c·col_stride (a transposed view swaps the two strides).
template <typename T>
struct StateView {
  T* data = nullptr;  // null: a zero initial state / no final state wanted
  int64_t bh_stride = 0, row_stride = 0, col_stride = 0;
  LINATTN_HD T* at(int64_t bh, int64_t r, int64_t c) const {
    return data + bh * bh_stride + r * row_stride + c * col_stride;
  }
};

// (m, dv + 1) contiguous states, one per index (a (batch, head), or (batch, head, segment)), as
// they are or transposed (rows = the augmented columns).
template <typename T>
StateView<T> augmented_state_view(T* data, int64_t m, int64_t dv, bool transposed) {
  StateView<T> view;
  view.data = data;
  view.bh_stride = m * (dv + 1);
  view.row_stride = transposed ? 1 : dv + 1;
  view.col_stride = transposed ? dv + 1 : 1;
  return view;
}

// Everything one launch reads and writes. Outputs are contiguous (B, H, rows, cols).
template <typename scalar_t, typename acc_t>
struct ScanProblem {
  using scalar_type = scalar_t;
  using acc_type = acc_t;
  // Sizes.
  int64_t batch = 0, heads = 0, q_len = 0, k_len = 0, feature_dim = 0, value_dim = 0;
  int feature_map = kFeatureIdentity;
  bool normalize = true;
  acc_t eps = acc_t(1e-6);
  // Inputs (any strides).
  Strided4<const scalar_t> q, k, v, grad_out, out_saved;
  const acc_t* normalizer_saved = nullptr;  // (B, H, T_q), the backward's
  const bool* key_padding = nullptr;        // (B, T_k), true = padded, or null
  // The scan.
  Rows p_rows = Rows::kQueryFeatures, k_rows = Rows::kKeyFeatures, v_rows = Rows::kAugmentedValues;
  int64_t reduction = 0;  // a: the width of P and K rows
  int64_t v_cols = 0;     // V columns split into tiles (the augmented column excluded)
  bool extra_column = false;  // every tile also carries V's augmented column (index v_cols)
  bool causal = false, reverse = false;
  // Full (non-causal) only: state_in already sums every K/V row (the forward's final state
  // handed to the backward), so the pass over them is skipped.
  bool state_complete = false;
  int64_t chunk = 32, tile = 32;
  StateView<const acc_t> state_in;
  StateView<acc_t> state_out;  // the augmented column is written by tile 0 only
  // Outputs.
  Epilogue epilogue = Epilogue::kOutput;
  scalar_t* out = nullptr;        // (B, H, rows of P, v_cols)
  acc_t* normalizer = nullptr;    // kOutput: (B, H, T_q)

  LINATTN_HD int64_t tiles() const { return v_cols > 0 ? (v_cols + tile - 1) / tile : 1; }
  LINATTN_HD int64_t blocks() const { return batch * heads * tiles(); }
  LINATTN_HD int64_t rows_of(Rows r) const {
    return (r == Rows::kQueryFeatures || r == Rows::kAugmentedCotangent) ? q_len : k_len;
  }
  LINATTN_HD int64_t width_of_tile() const { return tile + (extra_column ? 1 : 0); }
  LINATTN_HD int64_t row_ld() const { return reduction + 1; }  // +1: no bank conflicts

  // Shared memory of one block, in acc_t elements: P and K chunks (chunk × a), the V chunk,
  // the output rows and the scores (chunk × w, chunk × chunk), the state tile (a × w) and
  // three row scalars per chunk row for the cotangent rows.
  LINATTN_HD int64_t shared_elements() const {
    const int64_t w = width_of_tile();
    return 2 * chunk * row_ld() + 2 * chunk * w + chunk * chunk + reduction * w + 3 * chunk;
  }
};

// Whether key `row` of batch b is padded (only key-side rows can be: T_q may exceed T_k).
template <typename scalar_t, typename acc_t>
LINATTN_HD bool padded_key(const ScanProblem<scalar_t, acc_t>& p, int64_t b, int64_t row) {
  return p.key_padding != nullptr && p.key_padding[b * p.k_len + row];
}

// Element (row, col) of an operand, in the accumulation type. `info` holds the cotangent row's
// scalars (prepare_cotangent_row); rows past the end are never asked for.
template <typename scalar_t, typename acc_t>
LINATTN_HD acc_t operand(const ScanProblem<scalar_t, acc_t>& p, Rows kind, int64_t b, int64_t h,
                         int64_t row, int64_t col, const acc_t* info) {
  switch (kind) {
    case Rows::kQueryFeatures:
      return feature<acc_t>(p.feature_map, acc_t(p.q.at(b, h, row, col)));
    case Rows::kKeyFeatures:
      if (padded_key(p, b, row)) return acc_t(0);
      return feature<acc_t>(p.feature_map, acc_t(p.k.at(b, h, row, col)));
    case Rows::kAugmentedValues:
      if (padded_key(p, b, row)) return acc_t(0);
      return col < p.value_dim ? acc_t(p.v.at(b, h, row, col)) : acc_t(1);
    default: {  // kAugmentedCotangent, info = {no cotangent, 1 / normalizer, d normalizer}
      if (info[0] != acc_t(0)) return acc_t(0);
      if (col == p.value_dim) return p.normalize ? info[2] : acc_t(0);
      const acc_t g = acc_t(p.grad_out.at(b, h, row, col));
      return p.normalize ? g * info[1] : g;
    }
  }
}

// The cotangent row's scalars: whether its cotangent is all 0 (then it passes nothing, not
// 0·out), 1 / normalizer (0 where it vanished) and dL/d normalizer = -(g · out) / normalizer.
template <typename scalar_t, typename acc_t>
LINATTN_HD void prepare_cotangent_row(const ScanProblem<scalar_t, acc_t>& p, int64_t b, int64_t h,
                                      int64_t row, acc_t* info) {
  bool all_zero = true;
  acc_t g_dot_out = 0;
  for (int64_t c = 0; c < p.value_dim; ++c) {
    const acc_t gc = acc_t(p.grad_out.at(b, h, row, c));
    if (gc == acc_t(0)) continue;  // a zero cotangent adds nothing, not 0·Inf
    all_zero = false;
    g_dot_out += gc * acc_t(p.out_saved.at(b, h, row, c));
  }
  acc_t inv = 0;
  if (p.normalize) {
    const acc_t den = p.normalizer_saved[(b * p.heads + h) * p.q_len + row];
    inv = inverse_unless_vanished(den);
  }
  info[0] = all_zero ? acc_t(1) : acc_t(0);
  info[1] = inv;
  info[2] = -g_dot_out * inv;
}

// The block's shared memory, carved from one buffer.
template <typename acc_t>
struct BlockMemory {
  acc_t *P, *K, *V, *O, *A, *St, *info;
};

template <typename scalar_t, typename acc_t>
LINATTN_HD BlockMemory<acc_t> carve(const ScanProblem<scalar_t, acc_t>& p, acc_t* shared) {
  const int64_t C = p.chunk, w = p.width_of_tile(), ld = p.row_ld();
  BlockMemory<acc_t> m;
  m.P = shared;
  m.K = m.P + C * ld;
  m.V = m.K + C * ld;
  m.O = m.V + C * w;
  m.A = m.O + C * w;
  m.St = m.A + C * C;
  m.info = m.St + p.reduction * w;
  return m;
}

// The block program. `exec(phase)` runs phase(thread) on every thread of the block, then waits
// for all of them; exec.threads is the block's thread count.
template <typename Exec, typename scalar_t, typename acc_t>
LINATTN_HD void run_scan_block(const Exec& exec, const ScanProblem<scalar_t, acc_t>& p,
                               int64_t block, acc_t* shared) {
  const int64_t tiles = p.tiles();
  const int64_t tile_index = block % tiles, bh = block / tiles;
  const int64_t b = bh / p.heads, h = bh % p.heads;
  const int64_t t0 = tile_index * p.tile;
  const int64_t tile_cols = p.v_cols - t0 < p.tile ? p.v_cols - t0 : p.tile;
  const int64_t w = p.width_of_tile(), a = p.reduction, ld = p.row_ld(), C = p.chunk;
  const int64_t threads = exec.threads;
  const BlockMemory<acc_t> m = carve(p, shared);
  // Tile column t of V: one of this tile's columns, the augmented column, or -1 (unused,
  // loaded as 0).
  auto column = [&](int64_t t) -> int64_t {
    if (t < tile_cols) return t0 + t;
    return (p.extra_column && t == w - 1) ? p.v_cols : -1;
  };
  // Whether the state's column t belongs to this block's final state (the augmented column is
  // written by tile 0 only).
  auto writes_state_column = [&](int64_t t) {
    const int64_t c = column(t);
    return c >= 0 && (c < p.v_cols || tile_index == 0);
  };

  exec([&](int64_t tid) {
    for (int64_t e = tid; e < a * w; e += threads) {
      const int64_t r = e / w, t = e % w, c = column(t);
      m.St[e] = (p.state_in.data != nullptr && c >= 0) ? *p.state_in.at(bh, r, c) : acc_t(0);
    }
  });

  // Rows [start, start + n) of the operands into shared memory: which of P, K, V are wanted.
  auto load = [&](int64_t start, int64_t n, bool want_p, bool want_kv) {
    const Rows cot = Rows::kAugmentedCotangent;
    const bool cotangent = (want_p && p.p_rows == cot) || (want_kv && (p.k_rows == cot || p.v_rows == cot));
    if (cotangent) {
      exec([&](int64_t tid) {
        for (int64_t i = tid; i < n; i += threads) prepare_cotangent_row(p, b, h, start + i, m.info + 3 * i);
      });
    }
    exec([&](int64_t tid) {
      for (int64_t e = tid; e < C * ld; e += threads) {
        const int64_t i = e / ld, c = e % ld;
        const bool inside = i < n && c < a;
        const acc_t* info = m.info + 3 * i;
        if (want_p) m.P[e] = inside ? operand(p, p.p_rows, b, h, start + i, c, info) : acc_t(0);
        if (want_kv) m.K[e] = inside ? operand(p, p.k_rows, b, h, start + i, c, info) : acc_t(0);
      }
      if (want_kv) {
        for (int64_t e = tid; e < C * w; e += threads) {
          const int64_t i = e / w, c = column(e % w);
          m.V[e] = (i < n && c >= 0) ? operand(p, p.v_rows, b, h, start + i, c, m.info + 3 * i) : acc_t(0);
        }
      }
    });
  };

  // The rows of the chunk starting at `start` of `total` rows.
  auto rows_from = [&](int64_t start, int64_t total) { return total - start < C ? total - start : C; };

  // P_i · St[:, t]: row i's product with the state of the rows before its chunk.
  auto times_state = [&](int64_t i, int64_t t) {
    acc_t sum = 0;
    for (int64_t r = 0; r < a; ++r) sum += m.P[i * ld + r] * m.St[r * w + t];
    return sum;
  };

  // St += Σ_j K_j V_jᵀ over the chunk's rows (rows past the end were loaded as 0).
  auto update_state = [&](int64_t tid, int64_t n) {
    for (int64_t e = tid; e < a * w; e += threads) {
      const int64_t r = e / w, t = e % w;
      acc_t sum = 0;
      for (int64_t j = 0; j < n; ++j) sum += m.K[j * ld + r] * m.V[j * w + t];
      m.St[e] += sum;
    }
  };

  // Output rows [start, start + n) from O: the epilogue.
  auto store = [&](int64_t tid, int64_t start, int64_t n) {
    for (int64_t e = tid; e < n * p.tile; e += threads) {
      const int64_t i = e / p.tile, t = e % p.tile;
      const int64_t row = start + i;
      if (t >= tile_cols) continue;
      const int64_t col = t0 + t;
      const acc_t o = m.O[i * w + t];
      scalar_t* dst = p.out + ((bh * p.rows_of(p.p_rows)) + row) * p.v_cols + col;
      switch (p.epilogue) {
        case Epilogue::kOutput: {
          const acc_t den = m.O[i * w + (w - 1)] + p.eps;
          acc_t value = o;
          if (p.normalize) value = vanished(den) ? o * acc_t(0) : o / den;
          *dst = scalar_t(value);
          if (tile_index == 0 && t == 0) p.normalizer[bh * p.q_len + row] = den;
          break;
        }
        case Epilogue::kGradQuery:
          *dst = scalar_t(o * feature_derivative<acc_t>(p.feature_map, acc_t(p.q.at(b, h, row, col))));
          break;
        case Epilogue::kGradKey:
          *dst = padded_key(p, b, row)
                     ? scalar_t(acc_t(0))
                     : scalar_t(o * feature_derivative<acc_t>(p.feature_map, acc_t(p.k.at(b, h, row, col))));
          break;
        default:  // kGradValue
          *dst = padded_key(p, b, row) ? scalar_t(acc_t(0)) : scalar_t(o);
      }
    }
  };

  if (!p.causal) {
    // Full: the state over every K/V row first (unless state_in is that already), then every
    // P row against it.
    const int64_t kv_rows = p.state_complete ? 0 : p.rows_of(p.k_rows);
    for (int64_t start = 0; start < kv_rows; start += C) {
      const int64_t n = rows_from(start, kv_rows);
      load(start, n, false, true);
      exec([&](int64_t tid) { update_state(tid, n); });
    }
    const int64_t p_rows = p.rows_of(p.p_rows);
    for (int64_t start = 0; start < p_rows; start += C) {
      const int64_t n = rows_from(start, p_rows);
      load(start, n, true, false);
      exec([&](int64_t tid) {
        for (int64_t e = tid; e < n * w; e += threads) m.O[e] = times_state(e / w, e % w);
      });
      exec([&](int64_t tid) { store(tid, start, n); });
    }
  } else {
    // Causal scan over chunks, forwards or backwards in time.
    const int64_t T = p.q_len;
    const int64_t chunks = (T + C - 1) / C;
    for (int64_t step = 0; step < chunks; ++step) {
      const int64_t index = p.reverse ? chunks - 1 - step : step;
      const int64_t start = index * C;
      const int64_t n = rows_from(start, T);
      load(start, n, true, true);
      // Scores between the chunk's rows, only for visible pairs (j <= i, or j >= i in reverse).
      exec([&](int64_t tid) {
        for (int64_t e = tid; e < n * C; e += threads) {
          const int64_t i = e / C, j = e % C;
          const bool visible = j < n && (p.reverse ? j >= i : j <= i);
          acc_t sum = 0;
          if (visible)
            for (int64_t r = 0; r < a; ++r) sum += m.P[i * ld + r] * m.K[j * ld + r];
          m.A[e] = sum;
        }
      });
      // The rows' outputs: the state from the chunks before plus the visible rows of this one
      // (only those: a masked pair is left out, not multiplied by 0, so an Inf there stays out).
      exec([&](int64_t tid) {
        for (int64_t e = tid; e < n * w; e += threads) {
          const int64_t i = e / w, t = e % w;
          acc_t sum = times_state(i, t);
          const int64_t lo = p.reverse ? i : 0, hi = p.reverse ? n : i + 1;
          for (int64_t j = lo; j < hi; ++j) sum += m.A[i * C + j] * m.V[j * w + t];
          m.O[e] = sum;
        }
      });
      exec([&](int64_t tid) {
        store(tid, start, n);
        update_state(tid, n);
      });
    }
  }

  if (p.state_out.data != nullptr) {
    exec([&](int64_t tid) {
      for (int64_t e = tid; e < a * w; e += threads) {
        const int64_t r = e / w, t = e % w;
        if (writes_state_column(t)) *p.state_out.at(bh, r, column(t)) = m.St[e];
      }
    });
  }
}

}  // namespace fused
}  // namespace linattn
