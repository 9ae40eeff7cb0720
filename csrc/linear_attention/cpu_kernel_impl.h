// Included by the per-instruction-set sources cpu_kernel*.cpp (common/cpu_isa.h), after
// common/cpu_kernel_prelude.h and inside their target pragma.
//
// CPU kernels of kernelized linear attention (METHODS.md §1), chunked.
//
// Each (batch, head) is one work item for at::parallel_for; a thread walks its sequence in
// chunks of C rows. A chunk is first copied into contiguous accumulation-type scratch (this
// is where strides and float16/bfloat16 are dealt with), then every product is a small
// row-major GEMM (MKL's on x86 builds of torch, see common/cpu_gemm.h). Scratch is allocated once per thread.
//
// Forward, causal, chunk c with the state S' = [S | z] of all earlier rows:
//   O'_c = Q_c S' + tril(Q_c K_cᵀ) V'_c,   S' += K_cᵀ V'_c,   V' = [V | 1]
// The last column of O' is the normalizer. The backward recomputes states instead of storing
// them: one forward pass for dQ and one reverse pass (with R = Σ_{i≥j} q_i g'_iᵀ) for dK, dV.
//
// Masked terms are excluded, never multiplied by zero: a padded key's value is not loaded, and
// a chunk whose operand holds an Inf or NaN takes an exact triangular product instead of the
// GEMM with a zero-filled upper triangle (where 0·Inf = NaN would reach rows that cannot see
// that position). A row whose normalizer is exactly 0 gets a zero output and zero gradients.
#include "kernel.h"
#include "../common/cpu_gemm.h"
#include "../common/fast_math.h"
#include "../common/masked_product.h"
#include "../common/row_loader.h"

namespace linattn {
namespace LINATTN_ISA {
namespace {

// φ and its derivative, with the switch outside the element loops and branch-free bodies,
// so the loops vectorize. elu(x) + 1 is x + 1 for x > 0 and exp(x) otherwise (exactly, unlike
// expm1(x) + 1); its derivative is 1 for x > 0 and exp(x) otherwise.
template <typename acc_t>
void apply_feature_map(FeatureMap map, acc_t* x, int64_t rows, int64_t cols, int64_t ld) {
  if (map == kFeatureIdentity) return;
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* row = x + r * ld;
    if (map == kFeatureElu) {
      for (int64_t c = 0; c < cols; ++c) {
        const acc_t e = exp_nonpositive(row[c]);
        row[c] = row[c] > 0 ? row[c] + acc_t(1) : e;
      }
    } else {
      for (int64_t c = 0; c < cols; ++c) row[c] = row[c] < 0 ? acc_t(0) : row[c];  // NaN stays NaN
    }
  }
}

// grad[c] *= φ'(x[c]) for one row.
template <typename acc_t>
void apply_feature_map_derivative(FeatureMap map, acc_t* grad, const acc_t* x, int64_t cols) {
  if (map == kFeatureElu) {
    for (int64_t c = 0; c < cols; ++c) {
      const acc_t e = exp_nonpositive(x[c]);
      grad[c] *= x[c] > 0 ? acc_t(1) : e;
    }
  } else if (map == kFeatureRelu) {
    for (int64_t c = 0; c < cols; ++c) grad[c] = x[c] > 0 ? grad[c] : acc_t(0);
  }
}

// Zeroes the strictly upper triangle of an L×L row-major block: keeps key j <= query i.
template <typename acc_t>
void keep_causal(acc_t* a, int64_t L, int64_t ld) {
  for (int64_t i = 0; i < L; ++i) std::fill(a + i * ld + i + 1, a + i * ld + L, acc_t(0));
}

// A normalizer that is 0 or subnormal (only possible when eps underflows the accumulation type
// and the query's features miss every key, or signed features cancel): the row is defined as 0
// (numerator·0, so still NaN where it sees a NaN or Inf) and passes no gradient, instead of 0/0
// or a reciprocal that overflows. NaN is not vanished.
template <typename acc_t>
bool vanished(acc_t d) {
  return std::abs(d) < std::numeric_limits<acc_t>::min();
}

// out (L × w) += tril(A)·X, or tril(A)ᵀ·X when transpose_a: the causal product of a chunk,
// A's strictly upper triangle masked (keep_causal has zeroed it) and excluded.
template <typename acc_t>
void add_causal_product(bool transpose_a, int64_t L, int64_t w, const acc_t* A, int64_t lda,
                        const acc_t* X, int64_t ldx, acc_t* out, int64_t ldo) {
  add_masked_product(transpose_a, L, L, w, A, lda, X, ldx, out, ldo,
                     [](int64_t i, int64_t j) { return j <= i; });
}

template <typename scalar_t, typename acc_t>
struct Kernel {
  const LinearAttentionShape& s;
  int64_t C;    // chunk length
  int64_t m;    // feature dim
  int64_t dv;   // value dim
  int64_t dvp;  // dv + 1: augmented value / state width

  // Per-thread scratch, every block contiguous with leading dim = its column count.
  std::vector<acc_t> q, k, v, g, a, b, o, dk, raw, state, rstate;

  Kernel(const LinearAttentionShape& shape, int64_t chunk)
      : s(shape), C(chunk), m(shape.feature_dim), dv(shape.value_dim), dvp(shape.value_dim + 1) {
    q.resize(C * m);
    k.resize(C * m);
    v.resize(C * dvp);
    g.resize(C * dvp);
    a.resize(C * C);
    b.resize(C * C);
    o.resize(C * std::max(m, dvp));
    dk.resize(C * m);
    raw.resize(C * m);
    state.resize(m * dvp);
    rstate.resize(m * dvp);
  }

  // φ(rows t0..t0+L) of q or k; rows of padded keys (mask non-null and true) become 0.
  void load_features(std::vector<acc_t>& dst, const Strided4<const scalar_t>& x, int64_t bi,
                     int64_t hi, int64_t t0, int64_t L, const bool* mask = nullptr) {
    load_rows(dst.data(), m, x.row(bi, hi, t0), x.stride[2], x.stride[3], L, m);
    apply_feature_map(s.feature_map, dst.data(), L, m, m);
    if (mask)
      for (int64_t r = 0; r < L; ++r)
        if (mask[t0 + r]) std::fill(dst.data() + r * m, dst.data() + (r + 1) * m, acc_t(0));
  }

  // Stores the gradient with respect to raw q or k rows: dφ ⊙ φ'(x), 0 for padded keys.
  // dphi is overwritten; the scratch block `raw` receives the raw rows.
  void store_feature_grads(scalar_t* dst_bh, acc_t* dphi, const Strided4<const scalar_t>& x,
                           int64_t bi, int64_t hi, int64_t t0, int64_t L,
                           const bool* mask = nullptr) {
    if (s.feature_map != kFeatureIdentity)
      load_rows(raw.data(), m, x.row(bi, hi, t0), x.stride[2], x.stride[3], L, m);
    for (int64_t r = 0; r < L; ++r) {
      scalar_t* dst = dst_bh + (t0 + r) * m;
      acc_t* src = dphi + r * m;
      if (mask && mask[t0 + r]) {
        std::fill(dst, dst + m, scalar_t(0));
        continue;
      }
      apply_feature_map_derivative(s.feature_map, src, raw.data() + r * m, m);
      for (int64_t c = 0; c < m; ++c) dst[c] = static_cast<scalar_t>(src[c]);
    }
  }

  // V'_c = [V_c | 1]; a padded key's row is all 0 (its value is never read, so a NaN there
  // stays out of every sum).
  void load_values(const Strided4<const scalar_t>& x, int64_t bi, int64_t hi, int64_t t0, int64_t L,
                   const bool* mask) {
    load_rows(v.data(), dvp, x.row(bi, hi, t0), x.stride[2], x.stride[3], L, dv);
    for (int64_t r = 0; r < L; ++r) {
      acc_t* row = v.data() + r * dvp;
      row[dv] = acc_t(1);
      if (mask && mask[t0 + r]) std::fill(row, row + dvp, acc_t(0));
    }
  }

  // G'_c: the gradient with respect to the augmented output [numerator | normalizer].
  // normalized: o = n / d  =>  dn = g / d,  dd = -(g·o) / d. A zero cotangent contributes
  // nothing (not 0·o, which is NaN for a non-finite output): a row whose cotangent is all 0,
  // or whose d is 0 (zero output), passes no gradient.
  void load_output_grads(const Strided4<const scalar_t>& grad, const Strided4<const scalar_t>& out,
                         const acc_t* den, int64_t bi, int64_t hi, int64_t t0, int64_t L) {
    load_rows(g.data(), dvp, grad.row(bi, hi, t0), grad.stride[2], grad.stride[3], L, dv);
    for (int64_t r = 0; r < L; ++r) {
      acc_t* gr = g.data() + r * dvp;
      if (!s.normalize) {
        gr[dv] = acc_t(0);
        continue;
      }
      const scalar_t* orow = out.row(bi, hi, t0 + r);
      const acc_t d = den[t0 + r];
      const acc_t inv = vanished(d) ? acc_t(0) : acc_t(1) / d;
      acc_t dot = 0;
      bool any_cotangent = false;
      for (int64_t c = 0; c < dv; ++c) {
        const acc_t term = gr[c] * static_cast<acc_t>(orow[c * out.stride[3]]);
        dot += gr[c] == acc_t(0) ? acc_t(0) : term;
        any_cotangent |= gr[c] != acc_t(0);
      }
      if (!any_cotangent) {  // the row passes no gradient, even when its output is not finite
        std::fill(gr, gr + dvp, acc_t(0));
        continue;
      }
      for (int64_t c = 0; c < dv; ++c) gr[c] *= inv;
      gr[dv] = -dot * inv;
    }
  }

  void init_state(std::vector<acc_t>& st, const acc_t* src, int64_t bh) {
    if (src)
      std::copy(src + bh * m * dvp, src + (bh + 1) * m * dvp, st.begin());
    else
      std::fill(st.begin(), st.end(), acc_t(0));
  }

  // state += K_cᵀ V'_c
  void accumulate_state(int64_t L) {
    gemm<acc_t>(true, false, m, dvp, L, k.data(), m, v.data(), dvp, acc_t(1), state.data(), dvp);
  }

  // Non-causal: state += Σ_j φ(k_j) v'_jᵀ over every key of (bi, hi).
  void accumulate_all_keys(const Strided4<const scalar_t>& K, const Strided4<const scalar_t>& V,
                           int64_t bi, int64_t hi, const bool* mask) {
    for (int64_t t0 = 0; t0 < s.k_len; t0 += C) {
      const int64_t L = std::min(C, s.k_len - t0);
      load_features(k, K, bi, hi, t0, L, mask);
      load_values(V, bi, hi, t0, L, mask);
      accumulate_state(L);
    }
  }

  void store_output(scalar_t* out_bh, acc_t* den_bh, int64_t t0, int64_t L) {
    for (int64_t r = 0; r < L; ++r) {
      const acc_t* orow = o.data() + r * dvp;
      const acc_t d = orow[dv] + static_cast<acc_t>(s.eps);
      den_bh[t0 + r] = d;
      const acc_t scale = !s.normalize ? acc_t(1) : vanished(d) ? acc_t(0) : acc_t(1) / d;
      scalar_t* dst = out_bh + (t0 + r) * dv;
      for (int64_t c = 0; c < dv; ++c) dst[c] = static_cast<scalar_t>(orow[c] * scale);
    }
  }

  // Value gradients; a padded key's is 0 (its value was never read).
  void store_value_grads(scalar_t* dst_bh, const acc_t* src, int64_t ld, int64_t t0, int64_t L,
                         const bool* mask) {
    for (int64_t r = 0; r < L; ++r) {
      scalar_t* dst = dst_bh + (t0 + r) * dv;
      if (mask && mask[t0 + r]) {
        std::fill(dst, dst + dv, scalar_t(0));
        continue;
      }
      for (int64_t c = 0; c < dv; ++c) dst[c] = static_cast<scalar_t>(src[r * ld + c]);
    }
  }

  void forward(int64_t bh, Strided4<const scalar_t> Q, Strided4<const scalar_t> K,
               Strided4<const scalar_t> V, const bool* key_padding_mask, const acc_t* initial,
               scalar_t* out, acc_t* final_state, acc_t* den) {
    const int64_t bi = bh / s.heads, hi = bh % s.heads;
    const bool* mask = key_padding_mask ? key_padding_mask + bi * s.k_len : nullptr;
    const int64_t N = s.q_len;
    scalar_t* out_bh = out + bh * N * dv;
    acc_t* den_bh = den + bh * N;
    init_state(state, initial, bh);
    if (s.causal) {
      for (int64_t t0 = 0; t0 < N; t0 += C) {
        const int64_t L = std::min(C, N - t0);
        load_features(q, Q, bi, hi, t0, L);
        load_features(k, K, bi, hi, t0, L, mask);
        load_values(V, bi, hi, t0, L, mask);
        gemm<acc_t>(false, false, L, dvp, m, q.data(), m, state.data(), dvp, 0, o.data(), dvp);
        gemm<acc_t>(false, true, L, L, m, q.data(), m, k.data(), m, 0, a.data(), C);
        keep_causal(a.data(), L, C);
        add_causal_product(false, L, dvp, a.data(), C, v.data(), dvp, o.data(), dvp);
        accumulate_state(L);
        store_output(out_bh, den_bh, t0, L);
      }
    } else {
      accumulate_all_keys(K, V, bi, hi, mask);
      for (int64_t t0 = 0; t0 < N; t0 += C) {
        const int64_t L = std::min(C, N - t0);
        load_features(q, Q, bi, hi, t0, L);
        gemm<acc_t>(false, false, L, dvp, m, q.data(), m, state.data(), dvp, 0, o.data(), dvp);
        store_output(out_bh, den_bh, t0, L);
      }
    }
    std::copy(state.begin(), state.end(), final_state + bh * m * dvp);
  }

  void backward(int64_t bh, Strided4<const scalar_t> G, Strided4<const scalar_t> Q,
                Strided4<const scalar_t> K, Strided4<const scalar_t> V, Strided4<const scalar_t> O,
                const acc_t* den, const bool* key_padding_mask, const acc_t* initial,
                const acc_t* grad_final, scalar_t* dq, scalar_t* dk_out, scalar_t* dv_out,
                acc_t* grad_initial) {
    const int64_t bi = bh / s.heads, hi = bh % s.heads;
    const bool* mask = key_padding_mask ? key_padding_mask + bi * s.k_len : nullptr;
    const int64_t N = s.q_len, M = s.k_len;
    const acc_t* den_bh = den + bh * N;
    scalar_t* dq_bh = dq + bh * N * m;
    scalar_t* dk_bh = dk_out + bh * M * m;
    scalar_t* dv_bh = dv_out + bh * M * dv;
    acc_t* R = rstate.data();  // R = dL/dS' of the state seen by the current chunk
    init_state(rstate, grad_final, bh);
    init_state(state, initial, bh);

    if (s.causal) {
      // Pass 1, forward in time: dq_i = S'_i g'_i with S'_i the inclusive prefix state.
      for (int64_t t0 = 0; t0 < N; t0 += C) {
        const int64_t L = std::min(C, N - t0);
        load_features(k, K, bi, hi, t0, L, mask);
        load_values(V, bi, hi, t0, L, mask);
        load_output_grads(G, O, den_bh, bi, hi, t0, L);
        gemm<acc_t>(false, true, L, m, dvp, g.data(), dvp, state.data(), dvp, 0, o.data(), m);
        gemm<acc_t>(false, true, L, L, dvp, g.data(), dvp, v.data(), dvp, 0, b.data(), C);
        keep_causal(b.data(), L, C);
        add_causal_product(false, L, m, b.data(), C, k.data(), m, o.data(), m);
        accumulate_state(L);
        store_feature_grads(dq_bh, o.data(), Q, bi, hi, t0, L);
      }
      // Pass 2, backward in time: dk_j = R_j v'_j, dv'_j = R_jᵀ k_j, R_j = R_N + Σ_{i≥j} q_i g'_iᵀ.
      const int64_t last = N == 0 ? 0 : ((N - 1) / C) * C;
      for (int64_t t0 = last; t0 >= 0 && N > 0; t0 -= C) {
        const int64_t L = std::min(C, N - t0);
        load_features(q, Q, bi, hi, t0, L);
        load_features(k, K, bi, hi, t0, L, mask);
        load_values(V, bi, hi, t0, L, mask);
        load_output_grads(G, O, den_bh, bi, hi, t0, L);
        // dK_c = V'_c Rᵀ + (tril(G'_c V'_cᵀ))ᵀ Q_c
        gemm<acc_t>(false, true, L, m, dvp, v.data(), dvp, R, dvp, 0, dk.data(), m);
        gemm<acc_t>(false, true, L, L, dvp, g.data(), dvp, v.data(), dvp, 0, b.data(), C);
        keep_causal(b.data(), L, C);
        add_causal_product(true, L, m, b.data(), C, q.data(), m, dk.data(), m);
        // dV'_c = K_c R + (tril(Q_c K_cᵀ))ᵀ G'_c
        gemm<acc_t>(false, false, L, dvp, m, k.data(), m, R, dvp, 0, o.data(), dvp);
        gemm<acc_t>(false, true, L, L, m, q.data(), m, k.data(), m, 0, a.data(), C);
        keep_causal(a.data(), L, C);
        add_causal_product(true, L, dvp, a.data(), C, g.data(), dvp, o.data(), dvp);
        // R += Q_cᵀ G'_c
        gemm<acc_t>(true, false, m, dvp, L, q.data(), m, g.data(), dvp, 1, R, dvp);
        store_feature_grads(dk_bh, dk.data(), K, bi, hi, t0, L, mask);
        store_value_grads(dv_bh, o.data(), dvp, t0, L, mask);
      }
    } else {
      accumulate_all_keys(K, V, bi, hi, mask);
      // dq_i = S' g'_i;  R = R_N + Σ_i q_i g'_iᵀ
      for (int64_t t0 = 0; t0 < N; t0 += C) {
        const int64_t L = std::min(C, N - t0);
        load_features(q, Q, bi, hi, t0, L);
        load_output_grads(G, O, den_bh, bi, hi, t0, L);
        gemm<acc_t>(false, true, L, m, dvp, g.data(), dvp, state.data(), dvp, 0, o.data(), m);
        gemm<acc_t>(true, false, m, dvp, L, q.data(), m, g.data(), dvp, 1, R, dvp);
        store_feature_grads(dq_bh, o.data(), Q, bi, hi, t0, L);
      }
      // dk_j = R v'_j;  dv'_j = Rᵀ k_j
      for (int64_t t0 = 0; t0 < M; t0 += C) {
        const int64_t L = std::min(C, M - t0);
        load_features(k, K, bi, hi, t0, L, mask);
        load_values(V, bi, hi, t0, L, mask);
        gemm<acc_t>(false, true, L, m, dvp, v.data(), dvp, R, dvp, 0, dk.data(), m);
        gemm<acc_t>(false, false, L, dvp, m, k.data(), m, R, dvp, 0, o.data(), dvp);
        store_feature_grads(dk_bh, dk.data(), K, bi, hi, t0, L, mask);
        store_value_grads(dv_bh, o.data(), dvp, t0, L, mask);
      }
    }
    std::copy(rstate.begin(), rstate.end(), grad_initial + bh * m * dvp);
  }
};

// Causal chunks balance the C² intra-chunk products against the m·dv state products; without
// causality the chunk only sets the GEMM block, so it is longer.
int64_t chunk_length(const LinearAttentionShape& s) {
  return s.causal ? 64 : 256;
}

}  // namespace

template <typename scalar_t, typename acc_t>
void linear_attention_forward_cpu(const LinearAttentionShape& shape, Strided4<const scalar_t> q,
                                  Strided4<const scalar_t> k, Strided4<const scalar_t> v,
                                  const bool* key_padding_mask, const acc_t* initial_state,
                                  scalar_t* out, acc_t* final_state, acc_t* normalizer) {
  const int64_t chunk = chunk_length(shape);
  at::parallel_for(0, shape.batch * shape.heads, 1, [&](int64_t begin, int64_t end) {
    Kernel<scalar_t, acc_t> kernel(shape, chunk);
    for (int64_t bh = begin; bh < end; ++bh)
      kernel.forward(bh, q, k, v, key_padding_mask, initial_state, out, final_state, normalizer);
  });
}

template <typename scalar_t, typename acc_t>
void linear_attention_backward_cpu(const LinearAttentionShape& shape,
                                   Strided4<const scalar_t> grad_out, Strided4<const scalar_t> q,
                                   Strided4<const scalar_t> k, Strided4<const scalar_t> v,
                                   Strided4<const scalar_t> out, const acc_t* normalizer,
                                   const bool* key_padding_mask, const acc_t* initial_state,
                                   const acc_t* grad_final_state,
                                   scalar_t* grad_q, scalar_t* grad_k, scalar_t* grad_v,
                                   acc_t* grad_initial_state) {
  const int64_t chunk = chunk_length(shape);
  at::parallel_for(0, shape.batch * shape.heads, 1, [&](int64_t begin, int64_t end) {
    Kernel<scalar_t, acc_t> kernel(shape, chunk);
    for (int64_t bh = begin; bh < end; ++bh)
      kernel.backward(bh, grad_out, q, k, v, out, normalizer, key_padding_mask, initial_state,
                      grad_final_state,
                      grad_q, grad_k, grad_v, grad_initial_state);
  });
}

#define LINATTN_INSTANTIATE(scalar_t, acc_t)                                                     \
  template void linear_attention_forward_cpu<scalar_t, acc_t>(                                   \
      const LinearAttentionShape&, Strided4<const scalar_t>, Strided4<const scalar_t>,           \
      Strided4<const scalar_t>, const bool*, const acc_t*, scalar_t*, acc_t*, acc_t*);           \
  template void linear_attention_backward_cpu<scalar_t, acc_t>(                                  \
      const LinearAttentionShape&, Strided4<const scalar_t>, Strided4<const scalar_t>,           \
      Strided4<const scalar_t>, Strided4<const scalar_t>, Strided4<const scalar_t>, const acc_t*, \
      const bool*, const acc_t*, const acc_t*, scalar_t*, scalar_t*, scalar_t*, acc_t*);

LINATTN_INSTANTIATE(float, float)
LINATTN_INSTANTIATE(double, double)
LINATTN_INSTANTIATE(c10::Half, float)
LINATTN_INSTANTIATE(c10::BFloat16, float)
#undef LINATTN_INSTANTIATE

}  // namespace LINATTN_ISA
}  // namespace linattn
