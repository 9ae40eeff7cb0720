// The device-generic forward of plain linear attention (no decay, not packed) in as few ATen
// operations as the formula allows, since on a GPU each is a kernel launch and each temporary a
// pass over memory (issue 25 item 6; counted by benchmarks/bench_generic_passes.py). docs/guide/cuda.md
// ("The device-generic path") says what it rounds where.
//
// - bf16 inputs keep their dtype for φ(q), φ(k), [v | 1] and the chunk scores (elu+1 and relu
//   features: non-negative, so the scores do not cancel; the identity map is widened), and the products
//   that sum over the sequence (a chunk's own state, the outputs) accumulate into fp32 through
//   bmm's out_dtype overload where the device has it (CUDA), through fp32 copies of the operands
//   elsewhere: the same fp32 sums of exactly representable products. The state a chunk's queries
//   read is rounded to bf16 as the tensor-core kernels round it. fp16 is widened to fp32 first: its
//   65504 would overflow scores and states that bf16, with fp32's exponent range, holds.
// - φ of the queries and the keys in one list (_foreach ops: one launch for both on CUDA).
// - Non-finite values: the chunk's own product reads their finite part, and the rows that met
//   one get it back as a mark (the cumulative sum of the dropped part: 0, or ±inf/NaN from the
//   row that holds it on) added to the output in the same operation that normalizes it.
// - The normalizer is the ones column of the same products (non-causal without padded keys, the
//   state's z is φ(k)'s column sums instead, written beside S: no [v | 1] copy), and is divided by
//   directly where it cannot vanish (non-negative features, no initial state, eps above the
//   smallest normal).
#include "generic.h"
#include "../common/causal_product.h"
#include "op_checks.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <limits>
#include <vector>

namespace linattn {
namespace {

// The dtype φ(q), φ(k), [v | 1] and the chunk scores are kept in (see the file's comment). Signed
// features (the identity map) are widened: their scores cancel, and 16-bit scores lose what is left.
at::ScalarType storage_type(at::ScalarType input, FeatureMap map) {
  return input == at::kBFloat16 && map != kFeatureIdentity ? input : accumulate_type(input);
}

// Whether x is a tensor subclass, such as the fake tensors torch.export and the ONNX exporter trace
// this code with: the graph they record keeps to ops every exporter translates (no _foreach lists,
// no out_dtype overloads; PyTorch 2.14's Meta decomposition of baddbmm.dtype_out also misreads its
// arguments).
bool traced(const at::Tensor& x) { return x.key_set().has(c10::DispatchKey::Python); }

// Whether x's device has batched products of 16-bit operands into fp32 (bmm.dtype: CUDA, and
// Meta for shapes). Looked up in the dispatcher rather than by device name, so another backend
// that adds the overload gets it.
bool has_widening_bmm(const at::Tensor& x) {
  static const c10::OperatorHandle op = c10::Dispatcher::singleton().findSchemaOrThrow("aten::bmm", "dtype");
  return !traced(x) && op.hasKernelForDispatchKey(c10::legacyExtractDispatchKey(x.key_set()));
}

// a·b batched, accumulated and returned in `acc`.
at::Tensor wide_bmm(const at::Tensor& a, const at::Tensor& b, at::ScalarType acc) {
  if (a.scalar_type() == acc) return at::bmm(a, b);
  if (has_widening_bmm(a)) return at::bmm(a, b, acc);
  return at::bmm(a.to(acc), b.to(acc));
}

// out += a·b batched, out in the accumulation dtype.
void add_wide_bmm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == out.scalar_type()) {
    out.baddbmm_(a, b);
  } else if (has_widening_bmm(a)) {
    at::baddbmm_out(out, out, a, b, out.scalar_type());
  } else {
    out.baddbmm_(a.to(out.scalar_type()), b.to(out.scalar_type()));
  }
}

// out = a·b batched, written into `out` (in the accumulation dtype; any row stride).
void wide_bmm_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == out.scalar_type()) {
    at::bmm_out(out, a, b);
  } else if (has_widening_bmm(a)) {
    at::bmm_out(out, a, b, out.scalar_type());
  } else {
    at::bmm_out(out, a.to(out.scalar_type()), b.to(out.scalar_type()));
  }
}

// The non-causal final state [S | z] = φ(K)ᵀ [v | 1] (+ S0), (B, H, a, dv + 1) in `acc`, without
// the [v | 1] copy: S by one product written into the state's first columns, z as φ(K)'s column
// sums into its last. (out= operations: only for untracked, untraced operands.)
at::Tensor state_in_place(const at::Tensor& K, const at::Tensor& v, const at::Tensor& S0, at::ScalarType acc) {
  const int64_t B = K.size(0), H = K.size(1), a = K.size(3), dv = v.size(3);
  at::Tensor state = at::empty({B, H, a, dv + 1}, K.options().dtype(acc));
  at::Tensor S = state.narrow(-1, 0, dv).view({B * H, a, dv});  // B and H merge: a view
  wide_bmm_into(S, K.reshape({B * H, K.size(2), a}).transpose(-1, -2), v.reshape({B * H, v.size(2), dv}));
  at::Tensor z = state.select(-1, dv);
  at::sum_out(z, K, {2}, false, acc);
  if (S0.defined()) state.add_(S0);
  return state;
}

struct CausalSums {
  at::Tensor sums;         // (B, H, T, b) in the accumulation dtype: Q_i (S0 + Σ_{j≤i} K_j V_jᵀ)
  at::Tensor marks;        // (B, H, T, b) in V's dtype: 0, or non-finite where a row met a non-finite value
  at::Tensor final_state;  // (B, H, a, b)
};

// Q, K: (B, H, T, a), padded keys' rows 0; Vp: (B, H, n·C, b), its padding rows finite, consumed
// (it becomes the marks). The chunk is at least min(a, b) long, so the T/C chunk states held at once
// take no more memory than T·max(a, b) per batch·head, as much as one input.
CausalSums causal_sums(const at::Tensor& Q, const at::Tensor& K, at::Tensor Vp, const at::Tensor& S0,
                       int64_t C, at::ScalarType acc) {
  const int64_t B = Q.size(0), H = Q.size(1), T = Q.size(2), a = Q.size(3), b = Vp.size(3);
  const int64_t n = Vp.size(2) / C;
  const at::Tensor Qc = in_chunks(Q, n, C), Kc = in_chunks(K, n, C), Vc = Vp.view({B * H * n, C, b});
  // Each chunk's own state, from the values as they are: a non-finite value reaches every later
  // chunk through it (and the final state).
  const at::Tensor chunk_states = wide_bmm(Kc.transpose(-1, -2), Vc, acc).view({B, H, n, a, b});
  // Inside the chunk, the product reads the values' finite part (a masked pair is 0, and 0·inf
  // would carry a later row's inf or NaN into an earlier one); what was dropped comes back as the
  // marks (common/causal_product.h), added where the output is divided.
  const FiniteSplit split = split_non_finite(Vc, /*consume=*/true);
  at::Tensor O = wide_bmm(at::bmm(Qc, Kc.transpose(-1, -2)).tril_(), split.finite, acc);
  const auto [before, final_state] = entering_states(chunk_states, S0);
  const at::Tensor read = before.view({B * H * n, a, b});
  add_wide_bmm(O, Qc, read.scalar_type() == Qc.scalar_type() ? read : read.to(Qc.scalar_type()));
  return {O.view({B, H, n * C, b}).narrow(2, 0, T), split.marks.view({B, H, n * C, b}).narrow(2, 0, T),
          final_state};
}

}  // namespace

// x (B, H, T, d) as (B·H·n, C, d) chunks, padded with zero rows to n·C: a view unless T needs it.
at::Tensor in_chunks(const at::Tensor& x, int64_t n, int64_t C) {
  const int64_t pad = n * C - x.size(2);
  return (pad ? at::constant_pad_nd(x, {0, 0, 0, pad}) : x).reshape({x.size(0) * x.size(1) * n, C, x.size(3)});
}

// φ(q), φ(k) in `storage`. Untracked and untraced, as a list: elu+1 is exp(min(x, 0)) + max(x, 0)
// (exactly exp(x) below 0, as the CPU kernels), four list operations for both.
std::vector<at::Tensor> query_key_features(const at::Tensor& q, const at::Tensor& k, FeatureMap map,
                                           at::ScalarType storage) {
  if (tracked(q) || tracked(k) || traced(q) || traced(k)) {
    return {features(q.to(storage), map), features(k.to(storage), map)};
  }
  std::vector<at::Tensor> xs{q, k};
  if (q.scalar_type() != storage) xs = {q.to(storage), k.to(storage)};
  const bool own = q.scalar_type() != storage;  // xs are fresh copies: φ may overwrite them
  switch (map) {
    case kFeatureElu: {
      std::vector<at::Tensor> phi = own ? xs : at::_foreach_clamp_max(xs, 0);
      const std::vector<at::Tensor> positive = at::_foreach_clamp_min(xs, 0);
      if (own) at::_foreach_clamp_max_(phi, 0);
      at::_foreach_exp_(phi);
      at::_foreach_add_(phi, positive);
      return phi;
    }
    case kFeatureRelu:
      if (!own) return at::_foreach_clamp_min(xs, 0);
      at::_foreach_clamp_min_(xs, 0);
      return xs;
    default:
      return xs;
  }
}

// Whether every normalizer is at least eps >= the smallest normal number: the features are
// non-negative, so are the sums, and no initial state can make them negative. NaN stays NaN.
bool normalizer_cannot_vanish(FeatureMap map, bool has_initial_state, double eps, at::ScalarType acc) {
  const double rounded_eps = acc == at::kDouble ? eps : static_cast<double>(static_cast<float>(eps));
  const double tiny = acc == at::kDouble ? std::numeric_limits<double>::min() : std::numeric_limits<float>::min();
  return map != kFeatureIdentity && !has_initial_state && rounded_eps >= tiny;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_generic(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& initial_state, const std::optional<at::Tensor>& key_padding_mask,
    int64_t feature_map, bool causal, bool normalize, double eps) {
  check_forward_inputs(q, k, v, initial_state, key_padding_mask, feature_map, causal, eps);
  const LinearAttentionShape s = kernel_shape(q, k, v, feature_map, causal, normalize, eps);
  const auto acc = accumulate_type(q.scalar_type());
  const auto storage = storage_type(q.scalar_type(), s.feature_map);
  const std::vector<at::Tensor> phi = query_key_features(q, k, s.feature_map, storage);
  const at::Tensor& Q = phi[0];
  const at::Tensor K = mask_padded_keys(phi[1], k, key_padding_mask);
  const at::Tensor S0 = state_or_none(initial_state);
  const at::Tensor v_stored = v.scalar_type() == storage ? v : v.to(storage);
  const int64_t T = k.size(2);
  // Causal: chunks of C rows, [v | 1] padded to n·C rows with ones (the padded keys are 0).
  // Non-causal without padded keys (whose values must be zeroed first): no [v | 1] copy.
  const int64_t C = std::max<int64_t>(64, std::min(q.size(3), v.size(3) + 1));
  const int64_t pad = causal && T > 0 ? (T + C - 1) / C * C - T : 0;
  const bool without_ones = !causal && !key_padding_mask.has_value() && !traced(q) && !tracked(K) &&
                            !tracked(v_stored) && !tracked(S0);
  at::Tensor Vp;
  if (!without_ones) {
    Vp = at::constant_pad_nd(v_stored, {0, 1, 0, pad}, 1.0);
    if (key_padding_mask.has_value())
      Vp.narrow(2, 0, T).masked_fill_(key_padding_mask->unsqueeze(1).unsqueeze(-1), 0);
  }
  at::Tensor sums, marks, final_state;
  if (causal && T == 0) {
    sums = Q.new_zeros({q.size(0), q.size(1), 0, s.value_dim + 1}, Q.options().dtype(acc));
    final_state = S0.defined() ? S0.clone() : Q.new_zeros({q.size(0), q.size(1), q.size(3), s.value_dim + 1},
                                                         Q.options().dtype(acc));
  } else if (causal) {
    const CausalSums r = causal_sums(Q, K, Vp, S0, C, acc);
    sums = r.sums;
    marks = r.marks.narrow(-1, 0, s.value_dim);
    final_state = r.final_state;
  } else {
    const int64_t B = q.size(0), H = q.size(1), a = q.size(3), b = s.value_dim + 1;
    auto batched = [&](const at::Tensor& x) { return x.reshape({B * H, x.size(2), x.size(3)}); };
    final_state = without_ones
                      ? state_in_place(K, v_stored, S0, acc)
                      : plus_state(wide_bmm(batched(K).transpose(-1, -2), batched(Vp), acc).view({B, H, a, b}), S0);
    const at::Tensor read = final_state.scalar_type() == storage ? final_state : final_state.to(storage);
    sums = wide_bmm(batched(Q), read.view({B * H, a, b}), acc).view({B, H, q.size(2), b});
  }
  const bool may_vanish = !normalizer_cannot_vanish(s.feature_map, S0.defined(), eps, acc);
  const auto [out, normalizer] =
      normalized_output(sums, s.value_dim, normalize, eps, q.scalar_type(), may_vanish, marks);
  return {out, final_state.contiguous(), normalizer.contiguous()};
}

}  // namespace linattn
