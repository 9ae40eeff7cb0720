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
//
// Gates per key channel (Kimi Delta Attention: S_t = (I − β_t k_t k_tᵀ) Diag(e^{g_t}) S_{t−1} + …)
// change only where the factors sit: G_i becomes a row of dk cumulative gates, e^G and the decays
// scale q, k and the state's rows element by element, and a pair (i, j) weighs channel c by
// e^{G_ic − G_jc} inside the products K Kᵀ and Q Kᵀ (common/channel_pairs.h: split GEMMs, or exact
// pair sums in a chunk that fades too far). The same chunk formulas hold with e^G ⊙ Q for
// diag(e^G) Q, e^{G_last} ⊙ rows of S0, and Kt = K ⊙ e^{G_last − G} (docs/methods.md §11).
#include "../common/channel_pairs.h"
#include "../common/cpu_gemm.h"
#include "../common/masked_product.h"
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


constexpr double kL2Eps = 1e-6;  // x · (Σ x² + eps)^{-1/2}, as linattn.delta_rule.l2_normalize

// Rows of X (L × cols) scaled to unit length in place; r receives each row's (Σ x² + eps)^{-1/2}.
template <typename T>
void normalize_rows(T* X, T* r, int64_t L, int64_t cols) {
  for (int64_t i = 0; i < L; ++i) {
    T* x = X + i * cols;
    r[i] = T(1) / std::sqrt(dot(x, x, cols) + T(kL2Eps));
    for (int64_t c = 0; c < cols; ++c) x[c] *= r[i];
  }
}

// The gradient of the raw rows from that of the normalised ones x̂ = r x:
// dx = r (dx̂ − x̂ (x̂ · dx̂)), in place.
template <typename T>
void unnormalize_gradient(T* dX, const T* Xhat, const T* r, int64_t L, int64_t cols) {
  for (int64_t i = 0; i < L; ++i) {
    T* d = dX + i * cols;
    const T* x = Xhat + i * cols;
    const T along = dot(x, d, cols);
    for (int64_t c = 0; c < cols; ++c) d[c] = r[i] * (d[c] - x[c] * along);
  }
}

// The unit-triangular solves of the UT transform, row by row with the row's partial sums held in
// registers (kBlock columns at a time) instead of updating rows in memory once per term.
// Forward: x_i = x_i − Σ_{j<i} L_ij x_j (L strictly lower, leading dim ldl), rows in order.
// Adjoint: x_i = x_i − Σ_{j>i} L_ji x_j, rows in reverse: the solve with (I + L)ᵀ.
template <bool Adjoint, typename T>
void unit_triangular_solve(const T* L, int64_t ldl, T* X, int64_t ld, int64_t rows, int64_t n) {
  constexpr int64_t kBlock = 64;
  for (int64_t step = 0; step < rows; ++step) {
    const int64_t i = Adjoint ? rows - 1 - step : step;
    const int64_t j_begin = Adjoint ? i + 1 : 0, j_end = Adjoint ? rows : i;
    T* xi = X + i * ld;
    for (int64_t c0 = 0; c0 < n; c0 += kBlock) {
      const int64_t width = std::min(kBlock, n - c0);
      if (width == kBlock) {
        T acc[kBlock];
        for (int64_t c = 0; c < kBlock; ++c) acc[c] = xi[c0 + c];
        for (int64_t j = j_begin; j < j_end; ++j) {
          const T a = Adjoint ? L[j * ldl + i] : L[i * ldl + j];
          const T* xj = X + j * ld + c0;
          for (int64_t c = 0; c < kBlock; ++c) acc[c] -= a * xj[c];
        }
        for (int64_t c = 0; c < kBlock; ++c) xi[c0 + c] = acc[c];
      } else {
        for (int64_t j = j_begin; j < j_end; ++j) {
          const T a = Adjoint ? L[j * ldl + i] : L[i * ldl + j];
          axpy(-a, X + j * ld + c0, xi + c0, width);
        }
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
struct DeltaKernel {
  const DeltaRuleShape& s;
  const int64_t C = kDeltaChunk, dk, dv, H, T;
  const acc_t scale;

  // Per-thread scratch; row blocks have leading dim dk or dv, C × C blocks leading dim C.
  std::vector<acc_t> Q, K, V, dO, W, U, u, Kt, O, dQ, dK, dKt, dW, du;
  std::vector<acc_t> beta, G, eG, decay, dG, colsum, rq, rk;
  std::vector<acc_t> gamma, A, Bkk, P, dP;
  std::vector<acc_t> S, dS, tmpS;
  std::vector<acc_t> states;  // backward: the state entering every chunk of the item
  // Gates per key channel: the chunk's factors (pairs.eb = e^G, pairs.et = e^{G_last − G}),
  // dL/dG (L × dk) and two L × dk scratch blocks.
  const bool per_channel;
  ChannelPairs<acc_t> pairs;
  std::vector<acc_t> dGc, X1, X2;

  explicit DeltaKernel(const DeltaRuleShape& shape)
      : s(shape), dk(shape.key_dim), dv(shape.value_dim), H(shape.heads), T(shape.length),
        scale(static_cast<acc_t>(shape.scale)), per_channel(shape.gate_width > 1),
        pairs(per_channel ? kDeltaChunk : 0, per_channel ? shape.key_dim : 0) {
    if (per_channel)
      for (auto* b : {&dGc, &X1, &X2}) b->resize(C * dk);
    for (auto* b : {&Q, &K, &W, &Kt, &dQ, &dK, &dKt, &dW}) b->resize(C * dk);
    for (auto* b : {&V, &dO, &U, &u, &O, &du}) b->resize(C * dv);
    for (auto* b : {&beta, &G, &eG, &decay, &dG, &colsum, &rq, &rk}) b->resize(C);
    for (auto* b : {&gamma, &A, &Bkk, &P, &dP}) b->resize(C * C);
    for (auto* b : {&S, &dS, &tmpS}) b->resize(dk * dv);
  }

  // Row i's factor e^{G_i} (channel c of it per channel) and its decay to the chunk's end.
  acc_t row_fade(int64_t i, int64_t c) const { return per_channel ? pairs.eb[i * dk + c] : eG[i]; }
  acc_t to_end(int64_t i, int64_t c) const { return per_channel ? pairs.et[i * dk + c] : decay[i]; }

  int64_t row_index(const DeltaItem& it, int64_t t) const { return (it.b * H + it.h) * T + t; }

  // Loads rows [r0, r0 + L) of the item and everything a chunk derives from them alone.
  void prepare(const DeltaOperands<scalar_t, acc_t>& x, const DeltaItem& it, int64_t r0, int64_t L,
               bool want_grad_out) {
    load_chunk(x, it, r0, L, want_grad_out);
    transform(L);
  }

  // The rows, the gates' cumulative sums G, e^G, the decays to the chunk's end, Γ and Kt.
  void load_chunk(const DeltaOperands<scalar_t, acc_t>& x, const DeltaItem& it, int64_t r0, int64_t L,
                  bool want_grad_out) {
    const auto load = [&](const Strided4<const scalar_t>& t, acc_t* dst, int64_t cols) {
      load_rows(dst, cols, t.row(it.b, it.h, r0), t.stride[2], t.stride[3], L, cols);
    };
    load(x.q, Q.data(), dk);
    load(x.k, K.data(), dk);
    load(x.v, V.data(), dv);
    if (s.normalize_qk) {
      normalize_rows(Q.data(), rq.data(), L, dk);
      normalize_rows(K.data(), rk.data(), L, dk);
    }
    if (want_grad_out) {
      load(x.grad_out, dO.data(), dv);
      for (int64_t e = 0; e < L * dv; ++e) dO[e] *= scale;  // every use of dO carries the scale
    }
    const int64_t base = row_index(it, r0);
    for (int64_t i = 0; i < L; ++i) beta[i] = x.beta[base + i];
    if (per_channel) {
      pairs.load(x.log_gate + base * dk, L);
      for (int64_t e = 0; e < L * dk; ++e) Kt[e] = pairs.et[e] * K[e];
      return;
    }
    acc_t running(0);
    for (int64_t i = 0; i < L; ++i) {
      running += x.log_gate ? x.log_gate[base + i] : acc_t(0);
      G[i] = running;
      eG[i] = x.log_gate ? std::exp(running) : acc_t(1);
    }
    for (int64_t i = 0; i < L; ++i) decay[i] = x.log_gate ? std::exp(G[L - 1] - G[i]) : acc_t(1);
    for (int64_t i = 0; i < L; ++i) {
      acc_t* row = gamma.data() + i * C;
      if (x.log_gate) {
        for (int64_t j = 0; j <= i; ++j) row[j] = std::exp(G[i] - G[j]);
      } else {
        std::fill(row, row + i + 1, acc_t(1));  // DeltaNet: no gate, no exponentials
      }
    }
    for (int64_t i = 0; i < L; ++i) {
      const acc_t d = decay[i];
      for (int64_t c = 0; c < dk; ++c) Kt[i * dk + c] = d * K[i * dk + c];
    }
  }

  // The UT transform: Bkk, A, W and U.
  void transform(int64_t L) {
    // Bkk = strict_tril(K Kᵀ ⊙ Γ), A = diag(β) Bkk (per channel: the weights inside the product;
    // Bkk's diagonal, computed there, is never read).
    if (per_channel) {
      pairs.scores(K.data(), dk, K.data(), dk, Bkk.data(), L);
    } else {
      gemm<acc_t>(false, true, L, L, dk, K.data(), dk, K.data(), dk, acc_t(0), Bkk.data(), C);
      for (int64_t i = 0; i < L; ++i)
        for (int64_t j = 0; j < i; ++j) Bkk[i * C + j] *= gamma[i * C + j];
    }
    for (int64_t i = 0; i < L; ++i)
      for (int64_t j = 0; j < i; ++j) A[i * C + j] = beta[i] * Bkk[i * C + j];
    // (I + A) [W | U] = [diag(β) (e^G ⊙ K) | diag(β) V], by forward substitution.
    for (int64_t i = 0; i < L; ++i) {
      for (int64_t c = 0; c < dk; ++c) W[i * dk + c] = beta[i] * row_fade(i, c) * K[i * dk + c];
      for (int64_t c = 0; c < dv; ++c) U[i * dv + c] = beta[i] * V[i * dv + c];
    }
    unit_triangular_solve<false>(A.data(), C, W.data(), dk, L, dk);
    unit_triangular_solve<false>(A.data(), C, U.data(), dv, L, dv);
  }

  // The backward's forward pass keeps what the reverse pass needs of every chunk that depends on
  // more than its rows: W, U, u and Bkk (memory (dk + 2 dv + C) per row; A is diag(β) Bkk).
  std::vector<acc_t> kept_W, kept_U, kept_u, kept_B;

  void keep(int64_t c, int64_t L) {
    std::copy(W.begin(), W.begin() + L * dk, kept_W.begin() + c * C * dk);
    std::copy(U.begin(), U.begin() + L * dv, kept_U.begin() + c * C * dv);
    std::copy(u.begin(), u.begin() + L * dv, kept_u.begin() + c * C * dv);
    std::copy(Bkk.begin(), Bkk.begin() + L * C, kept_B.begin() + c * C * C);
  }

  void restore(int64_t c, int64_t L) {
    std::copy(kept_W.begin() + c * C * dk, kept_W.begin() + c * C * dk + L * dk, W.begin());
    std::copy(kept_U.begin() + c * C * dv, kept_U.begin() + c * C * dv + L * dv, U.begin());
    std::copy(kept_u.begin() + c * C * dv, kept_u.begin() + c * C * dv + L * dv, u.begin());
    std::copy(kept_B.begin() + c * C * C, kept_B.begin() + c * C * C + L * C, Bkk.begin());
    for (int64_t i = 0; i < L; ++i)
      for (int64_t j = 0; j < i; ++j) A[i * C + j] = beta[i] * Bkk[i * C + j];
  }

  // u = U − W S0.
  void pseudo_values(const acc_t* S0, int64_t L) {
    gemm<acc_t>(false, false, L, dv, dk, W.data(), dk, S0, dv, acc_t(0), u.data(), dv);
    for (int64_t e = 0; e < L * dv; ++e) u[e] = U[e] - u[e];
  }

  // P = tril(Q Kᵀ ⊙ Γ), diagonal included.
  void intra_scores(int64_t L) {
    if (per_channel) return pairs.scores(Q.data(), dk, K.data(), dk, P.data(), L);
    gemm<acc_t>(false, true, L, L, dk, Q.data(), dk, K.data(), dk, acc_t(0), P.data(), C);
    for (int64_t i = 0; i < L; ++i) {
      for (int64_t j = 0; j <= i; ++j) P[i * C + j] *= gamma[i * C + j];
      for (int64_t j = i + 1; j < L; ++j) P[i * C + j] = acc_t(0);
    }
  }

  // S ← e^{G_last} S + Ktᵀ u (per channel, row c of S by e^{G_last,c}).
  void advance_state(acc_t* state, int64_t L) {
    fade_state_rows(state, L);
    gemm<acc_t>(true, false, dk, dv, L, Kt.data(), dk, u.data(), dv, acc_t(1), state, dv);
  }

  // X (dk × dv) ← e^{G_last} X, row by row per channel.
  void fade_state_rows(acc_t* X, int64_t L) const {
    for (int64_t r = 0; r < dk; ++r) {
      const acc_t f = row_fade(L - 1, r);
      if (f == acc_t(1)) continue;
      for (int64_t c = 0; c < dv; ++c) X[r * dv + c] *= f;
    }
  }

  // dst (L × dk) = e^G ⊙ Q: the rows that read the state entering the chunk.
  void faded_queries(acc_t* dst, int64_t L) const {
    for (int64_t i = 0; i < L; ++i)
      for (int64_t c = 0; c < dk; ++c) dst[i * dk + c] = row_fade(i, c) * Q[i * dk + c];
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
    if (s.normalize_qk) normalize_rows(Q.data(), rq.data(), L, dk);
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
      if (s.causal) {  // O = scale · ((e^G ⊙ Q) S0 + P u), before S moves on
        intra_scores(L);
        faded_queries(dQ.data(), L);  // dQ is scratch in the forward
        gemm<acc_t>(false, false, L, dv, dk, dQ.data(), dk, S.data(), dv, acc_t(0), O.data(), dv);
        // (The masked pairs left out, not multiplied by 0: a later row's Inf or NaN in u never
        // reaches an earlier row, as in the per-token recurrence.)
        add_causal_product(false, L, dv, P.data(), C, u.data(), dv, O.data(), dv);
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
    kept_W.resize(chunks * C * dk);
    kept_U.resize(chunks * C * dv);
    kept_u.resize(chunks * C * dv);
    kept_B.resize(chunks * C * C);
    // Forward pass: the state entering every chunk.
    load_initial(x.initial, it, S.data());
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t r0 = it.begin + c * C, L = std::min(C, it.end - r0);
      std::copy(S.begin(), S.end(), states.begin() + c * dk * dv);
      prepare(x, it, r0, L, false);
      pseudo_values(S.data(), L);
      keep(c, L);
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
        if (s.normalize_qk) normalize_rows(Q.data(), rq.data(), L, dk);
        load_rows(dO.data(), dv, x.grad_out.row(it.b, it.h, r0), x.grad_out.stride[2], x.grad_out.stride[3], L, dv);
        for (int64_t e = 0; e < L * dv; ++e) dO[e] *= scale;
        gemm<acc_t>(true, false, dk, dv, L, Q.data(), dk, dO.data(), dv, acc_t(1), dS.data(), dv);
        gemm<acc_t>(false, true, L, dk, dv, dO.data(), dv, S.data(), dv, acc_t(0), dQ.data(), dk);
        if (s.normalize_qk) unnormalize_gradient(dQ.data(), Q.data(), rq.data(), L, dk);
        store_rows(x.dq + row_index(it, r0) * dk, dQ.data(), L, dk);
      }
    }
    for (int64_t c = chunks - 1; c >= 0; --c) {
      const int64_t r0 = it.begin + c * C, L = std::min(C, it.end - r0);
      chunk_backward(x, it, c, r0, L, states.data() + c * dk * dv);
    }
    std::copy(dS.begin(), dS.end(), x.grad_initial + it.state * dk * dv);
  }

  // One chunk of the reverse pass: dS holds dL/d(state after the chunk) on entry and
  // dL/d(state before it) on exit; the chunk's rows get their gradients. dL/dG collects in dG
  // (L) per token or dGc (L × dk) per channel; the gates' gradient is its suffix sums.
  void chunk_backward(const DeltaOperands<scalar_t, acc_t>& x, const DeltaItem& it, int64_t c, int64_t r0,
                      int64_t L, const acc_t* S0) {
    const bool causal = s.causal;
    load_chunk(x, it, r0, L, causal);
    restore(c, L);
    std::fill(dG.begin(), dG.begin() + L, acc_t(0));
    if (per_channel) std::fill(dGc.begin(), dGc.begin() + L * dk, acc_t(0));

    // S1 = e^{G_last} S0 + Ktᵀ u: du = Kt dS, dKt = u dSᵀ.
    gemm<acc_t>(false, false, L, dv, dk, Kt.data(), dk, dS.data(), dv, acc_t(0), du.data(), dv);
    gemm<acc_t>(false, true, L, dk, dv, u.data(), dv, dS.data(), dv, acc_t(0), dKt.data(), dk);
    state_fade_gradients(S0, L);

    if (causal) {  // O = (e^G ⊙ Q) S0 + P u, dO already scaled
      intra_scores(L);
      gemm<acc_t>(true, false, L, dv, L, P.data(), C, dO.data(), dv, acc_t(1), du.data(), dv);
      gemm<acc_t>(false, true, L, L, dv, dO.data(), dv, u.data(), dv, acc_t(0), dP.data(), C);
      gemm<acc_t>(false, true, L, dk, dv, dO.data(), dv, S0, dv, acc_t(0), dQ.data(), dk);
      if (per_channel) {
        for (int64_t e = 0; e < L * dk; ++e) {
          dQ[e] *= pairs.eb[e];
          dGc[e] += Q[e] * dQ[e];
        }
        // ∂P_ij/∂G_ic = q_ic k_jc e^{G_ic − G_jc} = −∂P_ij/∂G_jc; the pairs j > i are no pairs.
        clear_above_diagonal(dP.data(), L, 1);
        clear_blocks(L);
        pairs.to_queries(dP.data(), K.data(), dk, X1.data(), L);
        pairs.to_keys(dP.data(), Q.data(), dk, X2.data(), L);
        for (int64_t e = 0; e < L * dk; ++e) {
          dQ[e] += X1[e];
          dK[e] += X2[e];
          dGc[e] += Q[e] * X1[e] - K[e] * X2[e];
        }
      } else {
        score_gradients(L);
      }
    }

    // dS0 = e^{G_last} dS + (e^G ⊙ Q)ᵀ dO − Wᵀ du.
    gemm<acc_t>(true, false, dk, dv, L, W.data(), dk, du.data(), dv, acc_t(0), tmpS.data(), dv);
    fade_state_rows(dS.data(), L);
    for (int64_t e = 0; e < dk * dv; ++e) dS[e] -= tmpS[e];
    if (causal) {
      faded_queries(Kt.data(), L);  // Kt is free now
      gemm<acc_t>(true, false, dk, dv, L, Kt.data(), dk, dO.data(), dv, acc_t(1), dS.data(), dv);
    }

    // u = U − W S0: dU = du, dW = −du S0ᵀ; then through the solves: [dV̂ | dŴ] = (I + A)⁻ᵀ [dU | dW].
    gemm<acc_t>(false, true, L, dk, dv, du.data(), dv, S0, dv, acc_t(0), dW.data(), dk);
    for (int64_t e = 0; e < L * dk; ++e) dW[e] = -dW[e];
    unit_triangular_solve<true>(A.data(), C, du.data(), dv, L, dv);
    unit_triangular_solve<true>(A.data(), C, dW.data(), dk, L, dk);
    // dA = −(dV̂ Uᵀ + dŴ Wᵀ), strictly lower.
    gemm<acc_t>(false, true, L, L, dv, du.data(), dv, U.data(), dv, acc_t(0), dP.data(), C);
    gemm<acc_t>(false, true, L, L, dk, dW.data(), dk, W.data(), dk, acc_t(1), dP.data(), C);
    transform_gradients(x, it, r0, L);

    const int64_t base = row_index(it, r0);
    if (s.normalize_qk) {
      if (causal) unnormalize_gradient(dQ.data(), Q.data(), rq.data(), L, dk);
      unnormalize_gradient(dK.data(), K.data(), rk.data(), L, dk);
    }
    if (causal) store_rows(x.dq + base * dk, dQ.data(), L, dk);
    store_rows(x.dk + base * dk, dK.data(), L, dk);
    store_rows(x.dv + base * dv, O.data(), L, dv);
    if (x.dgate) store_gate_gradients(x.dgate, base, L);
  }

  // From dKt (the gradient of Kt = K ⊙ e^{G_last − G}) and dS (of S1 = e^{G_last} S0 + …): dK's
  // first term and dL/dG — row i's own gate fades its key (−), the last row's fades everything.
  void state_fade_gradients(const acc_t* S0, int64_t L) {
    if (!per_channel) {
      acc_t carried = eG[L - 1] * dot(dS.data(), S0, dk * dv);
      for (int64_t i = 0; i < L; ++i) {
        const acc_t r = decay[i] * dot(K.data() + i * dk, dKt.data() + i * dk, dk);
        carried += r;
        dG[i] -= r;
        for (int64_t cc = 0; cc < dk; ++cc) dK[i * dk + cc] = decay[i] * dKt[i * dk + cc];
      }
      dG[L - 1] += carried;
      return;
    }
    acc_t* carried = X1.data();  // per channel, dk entries
    for (int64_t cc = 0; cc < dk; ++cc)
      carried[cc] = pairs.eb[(L - 1) * dk + cc] * dot(dS.data() + cc * dv, S0 + cc * dv, dv);
    for (int64_t i = 0; i < L; ++i)
      for (int64_t cc = 0; cc < dk; ++cc) {
        const int64_t e = i * dk + cc;
        dK[e] = pairs.et[e] * dKt[e];
        const acc_t r = K[e] * dK[e];
        carried[cc] += r;
        dGc[e] -= r;
      }
    for (int64_t cc = 0; cc < dk; ++cc) dGc[(L - 1) * dk + cc] += carried[cc];
  }

  // Per token: dQ and dK through P = tril(Q Kᵀ ⊙ Γ) from dP, and dG through Γ.
  void score_gradients(int64_t L) {
    for (int64_t i = 0; i < L; ++i) {
      for (int64_t cc = 0; cc < dk; ++cc) dQ[i * dk + cc] *= eG[i];
      dG[i] += dot(Q.data() + i * dk, dQ.data() + i * dk, dk);
    }
    // dG_i += Σ_j E_ij − Σ_j E_ji for E = dP ⊙ P; dP becomes dZ = dP ⊙ Γ, the gradient of Q Kᵀ.
    acc_t* __restrict dp = dP.data();
    const acc_t* __restrict p = P.data();
    const acc_t* __restrict gm = gamma.data();
    acc_t* __restrict column = colsum.data();
    std::fill(column, column + L, acc_t(0));
    for (int64_t i = 0; i < L; ++i) {
      acc_t row(0);
      for (int64_t j = 0; j <= i; ++j) {
        const acc_t e = dp[i * C + j] * p[i * C + j];
        row += e;
        column[j] += e;
        dp[i * C + j] *= gm[i * C + j];
      }
      for (int64_t j = i + 1; j < L; ++j) dp[i * C + j] = acc_t(0);
      dG[i] += row;
    }
    for (int64_t j = 0; j < L; ++j) dG[j] -= column[j];
    gemm<acc_t>(false, false, L, dk, L, dP.data(), C, K.data(), dk, acc_t(1), dQ.data(), dk);
    gemm<acc_t>(true, false, L, dk, L, dP.data(), C, Q.data(), dk, acc_t(1), dK.data(), dk);
  }

  // From dV̂ (in du), dŴ (in dW) and −dA (in dP): dβ (stored), dV (into O), dK's and dG's terms
  // through W's right-hand side diag(β) (e^G ⊙ K) and through Bkk, whose gradient is F = dA ⊙ β_i.
  void transform_gradients(const DeltaOperands<scalar_t, acc_t>& x, const DeltaItem& it, int64_t r0, int64_t L) {
    acc_t* __restrict da = dP.data();  // −dA on entry; F (⊙ Γ per token) strictly lower on exit
    const acc_t* __restrict bkk = Bkk.data();
    const acc_t* __restrict gm = gamma.data();
    acc_t* __restrict column = colsum.data();
    std::fill(column, column + L, acc_t(0));
    for (int64_t i = 0; i < L; ++i) {
      const acc_t* dvh = du.data() + i * dv;
      const acc_t* dwh = dW.data() + i * dk;
      const acc_t b = beta[i];
      acc_t kw(0);  // (e^G ⊙ k_i) · dŴ_i
      for (int64_t cc = 0; cc < dk; ++cc) {
        const acc_t term = row_fade(i, cc) * K[i * dk + cc] * dwh[cc];
        kw += term;
        if (per_channel) dGc[i * dk + cc] += b * term;
      }
      acc_t db = dot(V.data() + i * dv, dvh, dv) + kw;
      acc_t row(0);
      for (int64_t j = 0; j < i; ++j) {
        const acc_t dA_ij = -da[i * C + j];
        const acc_t w = dA_ij * bkk[i * C + j];  // dA_ij · Bkk_ij; dA_ij · A_ij = β_i · w
        db += w;
        row += w;
        column[j] += b * w;
        da[i * C + j] = per_channel ? dA_ij * b : dA_ij * b * gm[i * C + j];
      }
      x.dbeta[row_index(it, r0 + i)] = db;
      if (!per_channel) dG[i] += b * (kw + row);
      for (int64_t cc = 0; cc < dk; ++cc) dK[i * dk + cc] += b * row_fade(i, cc) * dwh[cc];
      for (int64_t cc = 0; cc < dv; ++cc) O[i * dv + cc] = b * dvh[cc];  // dV
    }
    clear_above_diagonal(da, L, 0);
    if (per_channel) {  // Bkk_ij = Σ_c k_ic k_jc e^{G_ic − G_jc}: F towards row i and towards column j
      clear_blocks(L);
      pairs.to_queries(da, K.data(), dk, X1.data(), L);
      pairs.to_keys(da, K.data(), dk, X2.data(), L);
      for (int64_t e = 0; e < L * dk; ++e) {
        dK[e] += X1[e] + X2[e];
        dGc[e] += K[e] * (X1[e] - X2[e]);
      }
      return;
    }
    for (int64_t j = 0; j < L; ++j) dG[j] -= column[j];
    // F + Fᵀ: K Kᵀ is symmetric, so dK gets (F + Fᵀ) K in one product.
    for (int64_t i = 0; i < L; ++i)
      for (int64_t j = i + 1; j < L; ++j) da[i * C + j] = da[j * C + i];
    gemm<acc_t>(false, false, L, dk, L, dP.data(), C, K.data(), dk, acc_t(1), dK.data(), dk);
  }

  // The pair gradients' destinations X1, X2 (L × dk) = 0.
  void clear_blocks(int64_t L) {
    std::fill(X1.begin(), X1.begin() + L * dk, acc_t(0));
    std::fill(X2.begin(), X2.begin() + L * dk, acc_t(0));
  }

  // X (L × L, ld C) = 0 from column i + offset on in row i: the diagonal kept (offset 1) or not (0).
  void clear_above_diagonal(acc_t* X, int64_t L, int64_t offset) const {
    for (int64_t i = 0; i < L; ++i)
      if (i + offset < L) std::fill(X + i * C + i + offset, X + i * C + L, acc_t(0));
  }

  // g_l enters every G_i with i ≥ l of its chunk: dL/dg is the suffix sum of dL/dG (per channel).
  void store_gate_gradients(acc_t* dgate, int64_t base, int64_t L) {
    if (!per_channel) {
      acc_t suffix(0);
      for (int64_t i = L - 1; i >= 0; --i) {
        suffix += dG[i];
        dgate[base + i] = suffix;
      }
      return;
    }
    acc_t* suffix = X1.data();
    std::fill(suffix, suffix + dk, acc_t(0));
    for (int64_t i = L - 1; i >= 0; --i)
      for (int64_t cc = 0; cc < dk; ++cc) {
        suffix[cc] += dGc[i * dk + cc];
        dgate[(base + i) * dk + cc] = suffix[cc];
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
