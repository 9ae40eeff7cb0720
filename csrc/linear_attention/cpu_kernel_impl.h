// Included by the per-instruction-set sources that setup.py generates (common/cpu_isa.h), after
// common/cpu_kernel_prelude.h and inside their target pragma.
//
// CPU kernels of kernelized linear attention (docs/methods.md §1), chunked.
//
// Each (batch, head) is one work item for at::parallel_for (or, with fewer of them than
// threads, each segment of a sequence: sequence_parallel.h); a thread walks its rows in
// chunks of C. Operands that must be mapped, masked or converted are loaded into contiguous
// accumulation-type scratch (where strides and float16/bfloat16 are dealt with); fp32/fp64
// rows that need none of that are used where they lie. Every product is a row-major GEMM
// (MKL's on x86 builds of torch, see common/cpu_gemm.h). Scratch is allocated once per thread.
//
// Forward, causal, chunk c with the state [S | z] of all earlier rows:
//   N_c = Q_c S + tril(Q_c K_cᵀ) V_c,   d_c = Q_c z + rowsum(tril(Q_c K_cᵀ)) + eps,
//   S += K_cᵀ V_c,   z += colsum(K_c)
// (the augmented [S | z] of docs/methods.md with its ones column, split so that every GEMM has
// width dv). The backward recomputes states instead of storing them: one forward pass for dQ
// and one reverse pass (with R = Σ_{i≥j} q_i g'_iᵀ) for dK, dV.
//
// Masked terms are excluded, never multiplied by zero: a padded key's value is not loaded, and
// a chunk whose operand holds an Inf or NaN takes an exact triangular product instead of the
// GEMM with a zero-filled upper triangle (where 0·Inf = NaN would reach rows that cannot see
// that position). A row whose normalizer is exactly 0 gets a zero output and zero gradients.
#include "chunk_kernel.h"
#include "sequence_parallel.h"

namespace linattn {
namespace LINATTN_ISA {

template <typename scalar_t, typename acc_t>
void linear_attention_forward_cpu(const LinearAttentionShape& shape, Strided4<const scalar_t> q,
                                  Strided4<const scalar_t> k, Strided4<const scalar_t> v,
                                  const bool* key_padding_mask, const acc_t* log_decay,
                                  const acc_t* initial_state, scalar_t* out, acc_t* final_state,
                                  acc_t* normalizer) {
  Operands<scalar_t, acc_t> x;
  x.q = q, x.k = k, x.v = v, x.mask = key_padding_mask, x.initial = initial_state;
  x.log_decay = log_decay;
  x.o = out, x.final_state = final_state, x.den = normalizer;
  const int64_t chunk = chunk_length(shape);
  const int64_t parts = segments_per_sequence(shape, chunk);
  if (parts > 1) {
    SequenceParallel<scalar_t, acc_t>(shape, chunk, parts, x).forward();
    return;
  }
  at::parallel_for(0, shape.batch * shape.heads, 1, [&](int64_t begin, int64_t end) {
    Kernel<scalar_t, acc_t> kernel(shape, chunk);
    for (int64_t bh = begin; bh < end; ++bh) kernel.forward(x, bh);
  });
}

template <typename scalar_t, typename acc_t>
void linear_attention_backward_cpu(const LinearAttentionShape& shape,
                                   Strided4<const scalar_t> grad_out, Strided4<const scalar_t> q,
                                   Strided4<const scalar_t> k, Strided4<const scalar_t> v,
                                   Strided4<const scalar_t> out, const acc_t* normalizer,
                                   const bool* key_padding_mask, const acc_t* log_decay,
                                   const acc_t* initial_state, const acc_t* grad_final_state,
                                   const acc_t* final_state, scalar_t* grad_q, scalar_t* grad_k,
                                   scalar_t* grad_v, acc_t* grad_initial_state, acc_t* grad_log_decay) {
  Operands<scalar_t, acc_t> x;
  x.q = q, x.k = k, x.v = v, x.grad_out = grad_out, x.out = out, x.mask = key_padding_mask;
  x.initial = initial_state, x.grad_final = grad_final_state;
  x.seen_state = shape.causal ? nullptr : final_state;
  x.den = const_cast<acc_t*>(normalizer);  // read only in the backward
  x.dq = grad_q, x.dk = grad_k, x.dv = grad_v, x.grad_initial = grad_initial_state;
  x.log_decay = log_decay, x.grad_log_decay = grad_log_decay;
  const int64_t chunk = chunk_length(shape);
  const int64_t parts = segments_per_sequence(shape, chunk);
  if (parts > 1) {
    SequenceParallel<scalar_t, acc_t>(shape, chunk, parts, x).backward();
    return;
  }
  at::parallel_for(0, shape.batch * shape.heads, 1, [&](int64_t begin, int64_t end) {
    Kernel<scalar_t, acc_t> kernel(shape, chunk);
    for (int64_t bh = begin; bh < end; ++bh) kernel.backward(x, bh);
  });
}

// ---- Packed variable-length batches ----
//
// Many short sequences (graphs, packed documents): one parallel loop over every (sequence,
// head), each thread reusing its kernel's scratch, whose shape it points at the sequence in
// hand. A batch dominated by long sequences instead runs them one after the other, each on
// every thread (over heads, or along the sequence: sequence_parallel.h).

inline bool varlen_items_in_parallel(const LinearAttentionShape& shape, const int64_t* offsets,
                                     int64_t sequences) {
  const int64_t threads = at::get_num_threads();
  int64_t longest = 0;
  for (int64_t n = 0; n < sequences; ++n) longest = std::max(longest, offsets[n + 1] - offsets[n]);
  return sequences * shape.heads >= 4 * threads && longest * threads <= shape.q_len;
}

// The operands of sequence n: every pointer moved to its first row (or its state).
template <typename scalar_t, typename acc_t>
Operands<scalar_t, acc_t> sequence_operands(Operands<scalar_t, acc_t> x, const LinearAttentionShape& shape,
                                            int64_t n, int64_t start) {
  const int64_t m = shape.feature_dim, dv = shape.value_dim, state = shape.heads * m * (dv + 1);
  auto rows = [start](auto view) { return view.data ? view.from_row(start) : view; };
  auto at_row = [start](auto* p, int64_t width) { return p ? p + start * width : p; };
  auto at_state = [n, state](auto* p) { return p ? p + n * state : p; };
  x.q = rows(x.q), x.k = rows(x.k), x.v = rows(x.v), x.grad_out = rows(x.grad_out), x.out = rows(x.out);
  x.o = at_row(x.o, dv), x.den = at_row(x.den, 1), x.log_decay = at_row(x.log_decay, shape.decay_width);
  x.grad_log_decay = at_row(x.grad_log_decay, shape.decay_width);
  x.dq = at_row(x.dq, m), x.dk = at_row(x.dk, m), x.dv = at_row(x.dv, dv);
  x.initial = at_state(x.initial), x.final_state = at_state(x.final_state);
  x.grad_final = at_state(x.grad_final), x.grad_initial = at_state(x.grad_initial);
  x.seen_state = at_state(x.seen_state);
  return x;
}

// Runs run(kernel, operands, head) for every (sequence, head) item, in parallel.
template <typename scalar_t, typename acc_t, typename Run>
void for_each_sequence_head(const LinearAttentionShape& shape, const int64_t* offsets, int64_t sequences,
                            const Operands<scalar_t, acc_t>& x, Run run) {
  at::parallel_for(0, sequences * shape.heads, 1, [&](int64_t begin, int64_t end) {
    LinearAttentionShape local = shape;  // the kernel reads its lengths from here
    local.batch = 1;
    Kernel<scalar_t, acc_t> kernel(local, chunk_length(local));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / shape.heads, start = offsets[n];
      local.q_len = local.k_len = offsets[n + 1] - start;
      run(kernel, sequence_operands(x, shape, n, start), item % shape.heads);
    }
  });
}

inline LinearAttentionShape one_sequence(LinearAttentionShape shape, int64_t length) {
  shape.batch = 1;
  shape.q_len = shape.k_len = length;  // the pitch stays the packed length
  return shape;
}

template <typename scalar_t, typename acc_t>
void linear_attention_varlen_forward_cpu(const LinearAttentionShape& shape, const int64_t* offsets,
                                         int64_t sequences, Strided4<const scalar_t> q,
                                         Strided4<const scalar_t> k, Strided4<const scalar_t> v,
                                         const acc_t* log_decay, const acc_t* initial_state,
                                         scalar_t* out, acc_t* final_state, acc_t* normalizer) {
  Operands<scalar_t, acc_t> x;
  x.q = q, x.k = k, x.v = v, x.initial = initial_state, x.log_decay = log_decay;
  x.o = out, x.final_state = final_state, x.den = normalizer;
  if (varlen_items_in_parallel(shape, offsets, sequences)) {
    for_each_sequence_head(shape, offsets, sequences, x,
                           [](auto& kernel, const auto& xn, int64_t h) { kernel.forward(xn, h); });
    return;
  }
  for (int64_t n = 0; n < sequences; ++n) {
    const auto xn = sequence_operands(x, shape, n, offsets[n]);
    linear_attention_forward_cpu<scalar_t, acc_t>(one_sequence(shape, offsets[n + 1] - offsets[n]), xn.q, xn.k,
                                                  xn.v, nullptr, xn.log_decay, xn.initial, xn.o,
                                                  xn.final_state, xn.den);
  }
}

template <typename scalar_t, typename acc_t>
void linear_attention_varlen_backward_cpu(
    const LinearAttentionShape& shape, const int64_t* offsets, int64_t sequences,
    Strided4<const scalar_t> grad_out, Strided4<const scalar_t> q, Strided4<const scalar_t> k,
    Strided4<const scalar_t> v, Strided4<const scalar_t> out, const acc_t* normalizer,
    const acc_t* log_decay, const acc_t* initial_state, const acc_t* grad_final_state,
    const acc_t* final_state, scalar_t* grad_q, scalar_t* grad_k, scalar_t* grad_v,
    acc_t* grad_initial_state, acc_t* grad_log_decay) {
  Operands<scalar_t, acc_t> x;
  x.q = q, x.k = k, x.v = v, x.grad_out = grad_out, x.out = out;
  x.initial = initial_state, x.grad_final = grad_final_state;
  x.seen_state = shape.causal ? nullptr : final_state;
  x.den = const_cast<acc_t*>(normalizer);  // read only in the backward
  x.dq = grad_q, x.dk = grad_k, x.dv = grad_v, x.grad_initial = grad_initial_state;
  x.log_decay = log_decay, x.grad_log_decay = grad_log_decay;
  if (varlen_items_in_parallel(shape, offsets, sequences)) {
    for_each_sequence_head(shape, offsets, sequences, x,
                           [](auto& kernel, const auto& xn, int64_t h) { kernel.backward(xn, h); });
    return;
  }
  for (int64_t n = 0; n < sequences; ++n) {
    const auto xn = sequence_operands(x, shape, n, offsets[n]);
    linear_attention_backward_cpu<scalar_t, acc_t>(
        one_sequence(shape, offsets[n + 1] - offsets[n]), xn.grad_out, xn.q, xn.k, xn.v, xn.out, xn.den,
        nullptr, xn.log_decay, xn.initial, xn.grad_final, xn.seen_state, xn.dq, xn.dk, xn.dv, xn.grad_initial,
        xn.grad_log_decay);
  }
}

#define LINATTN_INSTANTIATE(scalar_t, acc_t)                                                     \
  template void linear_attention_forward_cpu<scalar_t, acc_t>(                                   \
      const LinearAttentionShape&, Strided4<const scalar_t>, Strided4<const scalar_t>,           \
      Strided4<const scalar_t>, const bool*, const acc_t*, const acc_t*, scalar_t*, acc_t*,      \
      acc_t*);                                                                                   \
  template void linear_attention_backward_cpu<scalar_t, acc_t>(                                  \
      const LinearAttentionShape&, Strided4<const scalar_t>, Strided4<const scalar_t>,           \
      Strided4<const scalar_t>, Strided4<const scalar_t>, Strided4<const scalar_t>, const acc_t*, \
      const bool*, const acc_t*, const acc_t*, const acc_t*, const acc_t*, scalar_t*, scalar_t*, \
      scalar_t*, acc_t*, acc_t*);                                                                \
  template void linear_attention_varlen_forward_cpu<scalar_t, acc_t>(                            \
      const LinearAttentionShape&, const int64_t*, int64_t, Strided4<const scalar_t>,            \
      Strided4<const scalar_t>, Strided4<const scalar_t>, const acc_t*, const acc_t*, scalar_t*, \
      acc_t*, acc_t*);                                                                           \
  template void linear_attention_varlen_backward_cpu<scalar_t, acc_t>(                           \
      const LinearAttentionShape&, const int64_t*, int64_t, Strided4<const scalar_t>,            \
      Strided4<const scalar_t>, Strided4<const scalar_t>, Strided4<const scalar_t>,              \
      Strided4<const scalar_t>, const acc_t*, const acc_t*, const acc_t*, const acc_t*,          \
      const acc_t*, scalar_t*, scalar_t*, scalar_t*, acc_t*, acc_t*);

LINATTN_INSTANTIATE(float, float)
LINATTN_INSTANTIATE(double, double)
LINATTN_INSTANTIATE(c10::Half, float)
LINATTN_INSTANTIATE(c10::BFloat16, float)
#undef LINATTN_INSTANTIATE

}  // namespace LINATTN_ISA
}  // namespace linattn
