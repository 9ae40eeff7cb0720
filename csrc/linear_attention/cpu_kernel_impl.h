// Included by the per-instruction-set sources cpu_kernel*.cpp (common/cpu_isa.h), after
// common/cpu_kernel_prelude.h and inside their target pragma.
//
// CPU kernels of kernelized linear attention (METHODS.md §1), chunked.
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
// (the augmented [S | z] of METHODS.md with its ones column, split so that every GEMM has
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
                                   scalar_t* grad_q, scalar_t* grad_k, scalar_t* grad_v,
                                   acc_t* grad_initial_state, acc_t* grad_log_decay) {
  Operands<scalar_t, acc_t> x;
  x.q = q, x.k = k, x.v = v, x.grad_out = grad_out, x.out = out, x.mask = key_padding_mask;
  x.initial = initial_state, x.grad_final = grad_final_state;
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

#define LINATTN_INSTANTIATE(scalar_t, acc_t)                                                     \
  template void linear_attention_forward_cpu<scalar_t, acc_t>(                                   \
      const LinearAttentionShape&, Strided4<const scalar_t>, Strided4<const scalar_t>,           \
      Strided4<const scalar_t>, const bool*, const acc_t*, const acc_t*, scalar_t*, acc_t*,      \
      acc_t*);                                                                                   \
  template void linear_attention_backward_cpu<scalar_t, acc_t>(                                  \
      const LinearAttentionShape&, Strided4<const scalar_t>, Strided4<const scalar_t>,           \
      Strided4<const scalar_t>, Strided4<const scalar_t>, Strided4<const scalar_t>, const acc_t*, \
      const bool*, const acc_t*, const acc_t*, const acc_t*, scalar_t*, scalar_t*, scalar_t*,    \
      acc_t*, acc_t*);

LINATTN_INSTANTIATE(float, float)
LINATTN_INSTANTIATE(double, double)
LINATTN_INSTANTIATE(c10::Half, float)
LINATTN_INSTANTIATE(c10::BFloat16, float)
#undef LINATTN_INSTANTIATE

}  // namespace LINATTN_ISA
}  // namespace linattn
