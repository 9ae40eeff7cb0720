// Included by the per-instruction-set sources that setup.py generates (common/cpu_isa.h), after
// common/cpu_kernel_prelude.h and inside their target pragma.
//
// CPU kernels of the delta rule (docs/methods.md §11), chunkwise (Yang et al. 2024; the gated
// form of Yang, Kautz and Hatamizadeh 2025). Each (batch, head) — or (sequence, head) of a packed
// batch — is one work item; a thread walks its rows in chunks of C = 64 rows (the last one
// shorter, never padded). Inside a chunk with incoming state S0, local cumulative log-gates
// G_i = Σ_{l≤i} g_l and Γ_ij = e^{G_i − G_j} (j ≤ i, exponents ≤ 0):
//
//   A   = strict_tril(diag(β) (K Kᵀ ⊙ Γ))                     (C × C)
//   W   = (I + A)⁻¹ diag(β e^G) K,   U = (I + A)⁻¹ diag(β) V   (forward substitution: the UT
//                                                              transform, never an inverse)
//   u   = U − W S0                                             (the chunk's "pseudo-values")
//   O   = scale · (diag(e^G) Q S0 + tril(Q Kᵀ ⊙ Γ) u)
//   S1  = e^{G_last} S0 + Kᵀ diag(e^{G_last − G}) u
//
// which is the per-token recurrence exactly (docs/methods.md §11 derives it). Everything but the
// two triangular solves is a row-major GEMM (common/cpu_gemm.h). The backward recomputes the
// states with a forward pass (one dk × dv state per chunk is kept: memory linear in T), then walks
// the chunks in reverse with the gradient of the state, dS, differentiating each step above;
// the solves' adjoints are backward substitutions with (I + A)ᵀ.
#include "../common/cpu_gemm.h"
#include "../common/row_loader.h"

namespace linattn {
namespace LINATTN_ISA {
namespace {

constexpr int64_t kDeltaChunk = 64;

// Rows [begin, end) of (b, h), whose states sit at index `state` of the state buffers.
struct DeltaItem {
  int64_t b, h, begin, end, state;
};

template <typename scalar_t, typename acc_t>
struct DeltaOperands {
  Strided4<const scalar_t> q, k, v, grad_out;
  const acc_t *beta = nullptr, *log_gate = nullptr, *initial = nullptr, *grad_final = nullptr;
  scalar_t* out = nullptr;
  acc_t* final_state = nullptr;
  scalar_t *dq = nullptr, *dk = nullptr, *dv = nullptr;
  acc_t *dbeta = nullptr, *dgate = nullptr, *grad_initial = nullptr;
};

template <typename T>
T dot(const T* a, const T* b, int64_t n) {
  T sum(0);
  for (int64_t x = 0; x < n; ++x) sum += a[x] * b[x];
  return sum;
}

template <typename T>
void axpy(T alpha, const T* x, T* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

template <typename scalar_t, typename acc_t>
struct DeltaKernel {
  const DeltaRuleShape& s;
  const int64_t C = kDeltaChunk, dk, dv, H, T;
  const acc_t scale;

  // Per-thread scratch; row blocks have leading dim dk or dv, C × C blocks leading dim C.
  std::vector<acc_t> Q, K, V, dO, W, U, u, Kt, O, dQ, dK, dKt, dW, du;
  std::vector<acc_t> beta, G, eG, decay, dG;
  std::vector<acc_t> gamma, A, Bkk, P, dP;
  std::vector<acc_t> S, dS, tmpS;
  std::vector<acc_t> states;  // backward: the state entering every chunk of the item

  explicit DeltaKernel(const DeltaRuleShape& shape)
      : s(shape), dk(shape.key_dim), dv(shape.value_dim), H(shape.heads), T(shape.length),
        scale(static_cast<acc_t>(shape.scale)) {
    for (auto* b : {&Q, &K, &W, &Kt, &dQ, &dK, &dKt, &dW}) b->resize(C * dk);
    for (auto* b : {&V, &dO, &U, &u, &O, &du}) b->resize(C * dv);
    for (auto* b : {&beta, &G, &eG, &decay, &dG}) b->resize(C);
    for (auto* b : {&gamma, &A, &Bkk, &P, &dP}) b->resize(C * C);
    for (auto* b : {&S, &dS, &tmpS}) b->resize(dk * dv);
  }

  int64_t row_index(const DeltaItem& it, int64_t t) const { return (it.b * H + it.h) * T + t; }

  // Loads rows [r0, r0 + L) of the item and everything a chunk derives from them alone: the
  // gates' cumulative sums and decays, Γ, A, W and U.
  void prepare(const DeltaOperands<scalar_t, acc_t>& x, const DeltaItem& it, int64_t r0, int64_t L,
               bool want_grad_out) {
    const auto load = [&](const Strided4<const scalar_t>& t, acc_t* dst, int64_t cols) {
      load_rows(dst, cols, t.row(it.b, it.h, r0), t.stride[2], t.stride[3], L, cols);
    };
    load(x.q, Q.data(), dk);
    load(x.k, K.data(), dk);
    load(x.v, V.data(), dv);
    if (want_grad_out) {
      load(x.grad_out, dO.data(), dv);
      for (int64_t e = 0; e < L * dv; ++e) dO[e] *= scale;  // every use of dO carries the scale
    }
    const int64_t base = row_index(it, r0);
    acc_t running(0);
    for (int64_t i = 0; i < L; ++i) {
      beta[i] = x.beta[base + i];
      running += x.log_gate ? x.log_gate[base + i] : acc_t(0);
      G[i] = running;
      eG[i] = std::exp(running);
    }
    for (int64_t i = 0; i < L; ++i) decay[i] = std::exp(G[L - 1] - G[i]);
    for (int64_t i = 0; i < L; ++i) {
      acc_t* row = gamma.data() + i * C;
      for (int64_t j = 0; j <= i; ++j) row[j] = std::exp(G[i] - G[j]);
    }
    // Bkk = strict_tril(K Kᵀ ⊙ Γ), A = diag(β) Bkk.
    gemm<acc_t>(false, true, L, L, dk, K.data(), dk, K.data(), dk, acc_t(0), Bkk.data(), C);
    for (int64_t i = 0; i < L; ++i) {
      for (int64_t j = 0; j < i; ++j) {
        Bkk[i * C + j] *= gamma[i * C + j];
        A[i * C + j] = beta[i] * Bkk[i * C + j];
      }
    }
    // (I + A) [W | U] = [diag(β e^G) K | diag(β) V], by forward substitution.
    for (int64_t i = 0; i < L; ++i) {
      acc_t* w = W.data() + i * dk;
      acc_t* uu = U.data() + i * dv;
      const acc_t bw = beta[i] * eG[i];
      for (int64_t c = 0; c < dk; ++c) w[c] = bw * K[i * dk + c];
      for (int64_t c = 0; c < dv; ++c) uu[c] = beta[i] * V[i * dv + c];
      for (int64_t j = 0; j < i; ++j) {
        const acc_t a = A[i * C + j];
        if (a == acc_t(0)) continue;
        axpy(-a, W.data() + j * dk, w, dk);
        axpy(-a, U.data() + j * dv, uu, dv);
      }
    }
    for (int64_t i = 0; i < L; ++i) {
      const acc_t d = decay[i];
      for (int64_t c = 0; c < dk; ++c) Kt[i * dk + c] = d * K[i * dk + c];
    }
  }

  // u = U − W S0.
  void pseudo_values(const acc_t* S0, int64_t L) {
    gemm<acc_t>(false, false, L, dv, dk, W.data(), dk, S0, dv, acc_t(0), u.data(), dv);
    for (int64_t e = 0; e < L * dv; ++e) u[e] = U[e] - u[e];
  }

  // P = tril(Q Kᵀ ⊙ Γ), diagonal included.
  void intra_scores(int64_t L) {
    gemm<acc_t>(false, true, L, L, dk, Q.data(), dk, K.data(), dk, acc_t(0), P.data(), C);
    for (int64_t i = 0; i < L; ++i) {
      for (int64_t j = 0; j <= i; ++j) P[i * C + j] *= gamma[i * C + j];
      for (int64_t j = i + 1; j < L; ++j) P[i * C + j] = acc_t(0);
    }
  }

  // S ← e^{G_last} S + Ktᵀ u.
  void advance_state(acc_t* state, int64_t L) {
    const acc_t carry = eG[L - 1];
    if (carry != acc_t(1)) for (int64_t e = 0; e < dk * dv; ++e) state[e] *= carry;
    gemm<acc_t>(true, false, dk, dv, L, Kt.data(), dk, u.data(), dv, acc_t(1), state, dv);
  }

  void store_rows(scalar_t* dst, const acc_t* src, int64_t L, int64_t cols) const {
    for (int64_t e = 0; e < L * cols; ++e) dst[e] = static_cast<scalar_t>(src[e]);
  }

  void load_initial(const acc_t* initial, const DeltaItem& it, acc_t* state) const {
    if (initial) {
      std::copy(initial + it.state * dk * dv, initial + (it.state + 1) * dk * dv, state);
    } else {
      std::fill(state, state + dk * dv, acc_t(0));
    }
  }

  // out = scale · Q S for rows [r0, r0 + L): the non-causal output, every query reading S.
  void read_state(const DeltaOperands<scalar_t, acc_t>& x, const DeltaItem& it, int64_t r0, int64_t L,
                  const acc_t* state) {
    load_rows(Q.data(), dk, x.q.row(it.b, it.h, r0), x.q.stride[2], x.q.stride[3], L, dk);
    gemm<acc_t>(false, false, L, dv, dk, Q.data(), dk, state, dv, acc_t(0), O.data(), dv);
    for (int64_t e = 0; e < L * dv; ++e) O[e] *= scale;
    store_rows(x.out + row_index(it, r0) * dv, O.data(), L, dv);
  }

  void forward(const DeltaOperands<scalar_t, acc_t>& x, const DeltaItem& it) {
    load_initial(x.initial, it, S.data());
    for (int64_t r0 = it.begin; r0 < it.end; r0 += C) {
      const int64_t L = std::min(C, it.end - r0);
      prepare(x, it, r0, L, false);
      pseudo_values(S.data(), L);
      if (s.causal) {  // O = scale · (diag(e^G) Q S0 + P u), before S moves on
        intra_scores(L);
        gemm<acc_t>(false, false, L, dv, dk, Q.data(), dk, S.data(), dv, acc_t(0), O.data(), dv);
        for (int64_t i = 0; i < L; ++i)
          for (int64_t c = 0; c < dv; ++c) O[i * dv + c] *= eG[i];
        gemm<acc_t>(false, false, L, dv, L, P.data(), C, u.data(), dv, acc_t(1), O.data(), dv);
        for (int64_t e = 0; e < L * dv; ++e) O[e] *= scale;
        store_rows(x.out + row_index(it, r0) * dv, O.data(), L, dv);
      }
      advance_state(S.data(), L);
    }
    if (!s.causal)
      for (int64_t r0 = it.begin; r0 < it.end; r0 += C) read_state(x, it, r0, std::min(C, it.end - r0), S.data());
    std::copy(S.begin(), S.end(), x.final_state + it.state * dk * dv);
  }

  void backward(const DeltaOperands<scalar_t, acc_t>& x, const DeltaItem& it) {
    const int64_t chunks = (it.end - it.begin + C - 1) / C;
    states.resize(std::max<int64_t>(chunks, 1) * dk * dv);
    // Forward pass: the state entering every chunk.
    load_initial(x.initial, it, S.data());
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t r0 = it.begin + c * C, L = std::min(C, it.end - r0);
      std::copy(S.begin(), S.end(), states.begin() + c * dk * dv);
      prepare(x, it, r0, L, false);
      pseudo_values(S.data(), L);
      advance_state(S.data(), L);
    }
    if (x.grad_final) {
      std::copy(x.grad_final + it.state * dk * dv, x.grad_final + (it.state + 1) * dk * dv, dS.begin());
    } else {
      std::fill(dS.begin(), dS.end(), acc_t(0));
    }
    if (!s.causal) {  // out = scale · Q S_T: dS_T += scale · Qᵀ dO, dQ = scale · dO S_Tᵀ
      for (int64_t r0 = it.begin; r0 < it.end; r0 += C) {
        const int64_t L = std::min(C, it.end - r0);
        load_rows(Q.data(), dk, x.q.row(it.b, it.h, r0), x.q.stride[2], x.q.stride[3], L, dk);
        load_rows(dO.data(), dv, x.grad_out.row(it.b, it.h, r0), x.grad_out.stride[2], x.grad_out.stride[3], L, dv);
        for (int64_t e = 0; e < L * dv; ++e) dO[e] *= scale;
        gemm<acc_t>(true, false, dk, dv, L, Q.data(), dk, dO.data(), dv, acc_t(1), dS.data(), dv);
        gemm<acc_t>(false, true, L, dk, dv, dO.data(), dv, S.data(), dv, acc_t(0), dQ.data(), dk);
        store_rows(x.dq + row_index(it, r0) * dk, dQ.data(), L, dk);
      }
    }
    for (int64_t c = chunks - 1; c >= 0; --c) {
      const int64_t r0 = it.begin + c * C, L = std::min(C, it.end - r0);
      chunk_backward(x, it, r0, L, states.data() + c * dk * dv);
    }
    std::copy(dS.begin(), dS.end(), x.grad_initial + it.state * dk * dv);
  }

  // One chunk of the reverse pass: dS holds dL/d(state after the chunk) on entry and
  // dL/d(state before it) on exit; the chunk's rows get their gradients.
  void chunk_backward(const DeltaOperands<scalar_t, acc_t>& x, const DeltaItem& it, int64_t r0, int64_t L,
                      const acc_t* S0) {
    const bool causal = s.causal;
    prepare(x, it, r0, L, causal);
    pseudo_values(S0, L);
    std::fill(dG.begin(), dG.begin() + L, acc_t(0));

    // S1 = e^{G_last} S0 + Ktᵀ u: du = Kt dS, dKt = u dSᵀ.
    gemm<acc_t>(false, false, L, dv, dk, Kt.data(), dk, dS.data(), dv, acc_t(0), du.data(), dv);
    gemm<acc_t>(false, true, L, dk, dv, u.data(), dv, dS.data(), dv, acc_t(0), dKt.data(), dk);
    acc_t carried = eG[L - 1] * dot(dS.data(), S0, dk * dv);
    for (int64_t i = 0; i < L; ++i) {
      const acc_t r = decay[i] * dot(K.data() + i * dk, dKt.data() + i * dk, dk);
      carried += r;
      dG[i] -= r;
      for (int64_t cc = 0; cc < dk; ++cc) dK[i * dk + cc] = decay[i] * dKt[i * dk + cc];
    }
    dG[L - 1] += carried;

    if (causal) {  // O = diag(e^G) Q S0 + P u, dO already scaled
      intra_scores(L);
      gemm<acc_t>(true, false, L, dv, L, P.data(), C, dO.data(), dv, acc_t(1), du.data(), dv);
      gemm<acc_t>(false, true, L, L, dv, dO.data(), dv, u.data(), dv, acc_t(0), dP.data(), C);
      gemm<acc_t>(false, true, L, dk, dv, dO.data(), dv, S0, dv, acc_t(0), dQ.data(), dk);
      for (int64_t i = 0; i < L; ++i) {
        for (int64_t cc = 0; cc < dk; ++cc) dQ[i * dk + cc] *= eG[i];
        dG[i] += dot(Q.data() + i * dk, dQ.data() + i * dk, dk);
      }
      for (int64_t i = 0; i < L; ++i) {
        for (int64_t j = 0; j <= i; ++j) {
          const acc_t e = dP[i * C + j] * P[i * C + j];
          dG[i] += e;
          dG[j] -= e;
          dP[i * C + j] *= gamma[i * C + j];  // dZ, the gradient of Q Kᵀ
        }
        for (int64_t j = i + 1; j < L; ++j) dP[i * C + j] = acc_t(0);
      }
      gemm<acc_t>(false, false, L, dk, L, dP.data(), C, K.data(), dk, acc_t(1), dQ.data(), dk);
      gemm<acc_t>(true, false, L, dk, L, dP.data(), C, Q.data(), dk, acc_t(1), dK.data(), dk);
    }

    // dS0 = e^{G_last} dS + (diag(e^G) Q)ᵀ dO − Wᵀ du.
    gemm<acc_t>(true, false, dk, dv, L, W.data(), dk, du.data(), dv, acc_t(0), tmpS.data(), dv);
    const acc_t carry = eG[L - 1];
    for (int64_t e = 0; e < dk * dv; ++e) dS[e] = carry * dS[e] - tmpS[e];
    if (causal) {
      for (int64_t i = 0; i < L; ++i)
        for (int64_t cc = 0; cc < dk; ++cc) Kt[i * dk + cc] = eG[i] * Q[i * dk + cc];  // Kt is free now
      gemm<acc_t>(true, false, dk, dv, L, Kt.data(), dk, dO.data(), dv, acc_t(1), dS.data(), dv);
    }

    // u = U − W S0: dU = du, dW = −du S0ᵀ; then through the solves: [dV̂ | dŴ] = (I + A)⁻ᵀ [dU | dW].
    gemm<acc_t>(false, true, L, dk, dv, du.data(), dv, S0, dv, acc_t(0), dW.data(), dk);
    for (int64_t e = 0; e < L * dk; ++e) dW[e] = -dW[e];
    for (int64_t i = L - 1; i >= 0; --i) {
      const acc_t* xv = du.data() + i * dv;
      const acc_t* xw = dW.data() + i * dk;
      for (int64_t j = 0; j < i; ++j) {
        const acc_t a = A[i * C + j];
        if (a == acc_t(0)) continue;
        axpy(-a, xv, du.data() + j * dv, dv);
        axpy(-a, xw, dW.data() + j * dk, dk);
      }
    }
    // dA = −(dV̂ Uᵀ + dŴ Wᵀ), strictly lower.
    gemm<acc_t>(false, true, L, L, dv, du.data(), dv, U.data(), dv, acc_t(0), dP.data(), C);
    gemm<acc_t>(false, true, L, L, dk, dW.data(), dk, W.data(), dk, acc_t(1), dP.data(), C);
    for (int64_t i = 0; i < L; ++i) {
      const acc_t* dvh = du.data() + i * dv;
      const acc_t* dwh = dW.data() + i * dk;
      const acc_t kw = eG[i] * dot(K.data() + i * dk, dwh, dk);
      acc_t db = dot(V.data() + i * dv, dvh, dv) + kw;
      dG[i] += beta[i] * kw;
      for (int64_t j = 0; j < i; ++j) {
        const acc_t da = -dP[i * C + j];
        db += da * Bkk[i * C + j];
        const acc_t d = da * A[i * C + j];
        dG[i] += d;
        dG[j] -= d;
        dP[i * C + j] = da * beta[i] * gamma[i * C + j];  // F, the gradient of K Kᵀ
      }
      for (int64_t j = i; j < L; ++j) dP[i * C + j] = acc_t(0);
      x.dbeta[row_index(it, r0 + i)] = db;
      const acc_t bw = beta[i] * eG[i];
      for (int64_t cc = 0; cc < dk; ++cc) dK[i * dk + cc] += bw * dwh[cc];
      for (int64_t cc = 0; cc < dv; ++cc) O[i * dv + cc] = beta[i] * dvh[cc];  // dV
    }
    gemm<acc_t>(false, false, L, dk, L, dP.data(), C, K.data(), dk, acc_t(1), dK.data(), dk);
    gemm<acc_t>(true, false, L, dk, L, dP.data(), C, K.data(), dk, acc_t(1), dK.data(), dk);

    const int64_t base = row_index(it, r0);
    if (causal) store_rows(x.dq + base * dk, dQ.data(), L, dk);
    store_rows(x.dk + base * dk, dK.data(), L, dk);
    store_rows(x.dv + base * dv, O.data(), L, dv);
    if (x.dgate) {  // g_l enters every G_i with i ≥ l of its chunk
      acc_t suffix(0);
      for (int64_t i = L - 1; i >= 0; --i) {
        suffix += dG[i];
        x.dgate[base + i] = suffix;
      }
    }
  }
};

// The work items: every (batch, head), or every (sequence, head) of a packed batch.
inline std::vector<DeltaItem> delta_items(const DeltaRuleShape& s, const int64_t* offsets, int64_t sequences) {
  std::vector<DeltaItem> items;
  if (offsets) {
    for (int64_t n = 0; n < sequences; ++n)
      for (int64_t h = 0; h < s.heads; ++h) items.push_back({0, h, offsets[n], offsets[n + 1], n * s.heads + h});
  } else {
    for (int64_t b = 0; b < s.batch; ++b)
      for (int64_t h = 0; h < s.heads; ++h) items.push_back({b, h, 0, s.length, b * s.heads + h});
  }
  return items;
}

}  // namespace

template <typename scalar_t, typename acc_t>
void delta_rule_forward_cpu(const DeltaRuleShape& shape, const int64_t* offsets, int64_t sequences,
                            Strided4<const scalar_t> q, Strided4<const scalar_t> k, Strided4<const scalar_t> v,
                            const acc_t* beta, const acc_t* log_gate, const acc_t* initial_state, scalar_t* out,
                            acc_t* final_state) {
  DeltaOperands<scalar_t, acc_t> x;
  x.q = q, x.k = k, x.v = v, x.beta = beta, x.log_gate = log_gate, x.initial = initial_state;
  x.out = out, x.final_state = final_state;
  const std::vector<DeltaItem> items = delta_items(shape, offsets, sequences);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    DeltaKernel<scalar_t, acc_t> kernel(shape);
    for (int64_t n = begin; n < end; ++n) kernel.forward(x, items[n]);
  });
}

template <typename scalar_t, typename acc_t>
void delta_rule_backward_cpu(const DeltaRuleShape& shape, const int64_t* offsets, int64_t sequences,
                             Strided4<const scalar_t> grad_out, Strided4<const scalar_t> q,
                             Strided4<const scalar_t> k, Strided4<const scalar_t> v, const acc_t* beta,
                             const acc_t* log_gate, const acc_t* initial_state, const acc_t* grad_final_state,
                             scalar_t* grad_q, scalar_t* grad_k, scalar_t* grad_v, acc_t* grad_beta,
                             acc_t* grad_log_gate, acc_t* grad_initial_state) {
  DeltaOperands<scalar_t, acc_t> x;
  x.q = q, x.k = k, x.v = v, x.grad_out = grad_out, x.beta = beta, x.log_gate = log_gate;
  x.initial = initial_state, x.grad_final = grad_final_state;
  x.dq = grad_q, x.dk = grad_k, x.dv = grad_v, x.dbeta = grad_beta, x.dgate = grad_log_gate;
  x.grad_initial = grad_initial_state;
  const std::vector<DeltaItem> items = delta_items(shape, offsets, sequences);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    DeltaKernel<scalar_t, acc_t> kernel(shape);
    for (int64_t n = begin; n < end; ++n) kernel.backward(x, items[n]);
  });
}

// Explicit instantiations: the operators call these from cpu.cpp.
#define LINATTN_DELTA_RULE_INSTANTIATE(scalar_t, acc_t)                                                    \
  template void delta_rule_forward_cpu<scalar_t, acc_t>(                                                   \
      const DeltaRuleShape&, const int64_t*, int64_t, Strided4<const scalar_t>, Strided4<const scalar_t>,  \
      Strided4<const scalar_t>, const acc_t*, const acc_t*, const acc_t*, scalar_t*, acc_t*);              \
  template void delta_rule_backward_cpu<scalar_t, acc_t>(                                                  \
      const DeltaRuleShape&, const int64_t*, int64_t, Strided4<const scalar_t>, Strided4<const scalar_t>,  \
      Strided4<const scalar_t>, Strided4<const scalar_t>, const acc_t*, const acc_t*, const acc_t*,        \
      const acc_t*, scalar_t*, scalar_t*, scalar_t*, acc_t*, acc_t*, acc_t*);
LINATTN_DELTA_RULE_INSTANTIATE(float, float)
LINATTN_DELTA_RULE_INSTANTIATE(double, double)
LINATTN_DELTA_RULE_INSTANTIATE(c10::Half, float)
LINATTN_DELTA_RULE_INSTANTIATE(c10::BFloat16, float)
#undef LINATTN_DELTA_RULE_INSTANTIATE

}  // namespace LINATTN_ISA
}  // namespace linattn
