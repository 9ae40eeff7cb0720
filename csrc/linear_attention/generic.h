// The device-generic linear attention (generic.cpp), callable from other kernels: the fused
// CUDA operators fall back to it for head dims too large for one block's shared memory.
#pragma once

#include "feature_map.h"

#include <ATen/core/Tensor.h>

#include <initializer_list>
#include <optional>
#include <tuple>
#include <vector>

namespace linattn {

// Whether autograd records ops on x (the CompositeImplicitAutograd kernels run this code on
// tracked tensors): then no out= variants, and no in-place op on a value a backward keeps.
bool tracked(const at::Tensor& x);
// Whether any of them is: a backward whose inputs nothing records may work in place.
bool any_tracked(std::initializer_list<at::Tensor> xs);

// The state, or an undefined tensor (nothing to add) when none was given; x + state, or x itself.
inline at::Tensor state_or_none(const std::optional<at::Tensor>& state) {
  return state.has_value() ? *state : at::Tensor();
}
at::Tensor plus_state(const at::Tensor& x, const at::Tensor& state);

// φ(x) of a fused feature map in ATen ops (elu+1 as exp(x) for x <= 0, as the CPU kernels), and
// its derivative (elu+1 and relu; the identity's is 1).
at::Tensor features(const at::Tensor& x, FeatureMap map);
at::Tensor feature_derivative(const at::Tensor& x, FeatureMap map);

// Building blocks of the generic formulations (generic.cpp), in the accumulation dtype:
// [v | 1] and φ(k) with padded keys' rows 0 (φ computed here, or given); the normalizer test (0 or
// subnormal: the row is 0); (out in out_dtype, contiguous; normalizer) from the augmented sums
// O = [numerator | denominator] — `may_vanish` false skips the test where no normalizer can vanish,
// `marks` (when defined) are added to the output —; the state entering each chunk of a causal scan
// and the final state; the cotangent of O from the output's.
at::Tensor augmented_values(const at::Tensor& v, const std::optional<at::Tensor>& mask, at::ScalarType acc);
at::Tensor key_features(const at::Tensor& k, const std::optional<at::Tensor>& mask, FeatureMap map);
at::Tensor mask_padded_keys(const at::Tensor& phi, const at::Tensor& k, const std::optional<at::Tensor>& mask);
at::Tensor vanished(const at::Tensor& normalizer);
std::tuple<at::Tensor, at::Tensor> entering_states(const at::Tensor& chunk_states, const at::Tensor& S0);
std::tuple<at::Tensor, at::Tensor> normalized_output(const at::Tensor& O, int64_t value_dim, bool normalize,
                                                     double eps, at::ScalarType out_dtype, bool may_vanish = true,
                                                     const at::Tensor& marks = at::Tensor());
at::Tensor augmented_cotangent(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& normalizer,
                               bool normalize);

// For a backward: φ(q), φ(k) and their derivatives (undefined for the identity map) from the
// backward's widened inputs q_acc, k_acc (q: the input, to tell whether q_acc is a copy of it).
// `in_place` (nothing records): elu+1's φ is built from its derivative, both for q and k as one
// list, in place in q_acc and k_acc where those are the backward's own copies. And the chain rule's
// last step: grad ⊙ φ' (undefined: 1) in `dtype`, rounded once, contiguous.
struct BackwardFeatures {
  at::Tensor Q, K, dphi_q, dphi_k;
};
BackwardFeatures backward_features(const at::Tensor& q, const at::Tensor& q_acc, const at::Tensor& k_acc,
                                   FeatureMap map, bool in_place);
at::Tensor through_features(const at::Tensor& grad, const at::Tensor& derivative, at::ScalarType dtype,
                            bool in_place);

// generic_forward.cpp: φ(q), φ(k) in `storage` (as one list where nothing traces or records), and
// whether no normalizer can vanish (non-negative features, no initial state, eps >= the smallest
// normal number), so that normalized_output may skip its test.
std::vector<at::Tensor> query_key_features(const at::Tensor& q, const at::Tensor& k, FeatureMap map,
                                           at::ScalarType storage);
// x (B, H, T, d) as (B·H·n, C, d) chunks, padded with zero rows to n·C: a view unless T needs it.
at::Tensor in_chunks(const at::Tensor& x, int64_t n, int64_t C);
bool normalizer_cannot_vanish(FeatureMap map, bool has_initial_state, double eps, at::ScalarType acc);

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_generic(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& initial_state, const std::optional<at::Tensor>& key_padding_mask,
    int64_t feature_map, bool causal, bool normalize, double eps);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_generic(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_final_state,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& normalizer, const std::optional<at::Tensor>& initial_state,
    const std::optional<at::Tensor>& key_padding_mask, int64_t feature_map, bool causal,
    bool normalize, const std::optional<at::Tensor>& final_state);

// The fading-state (log_decay) and packed (cu_seqlens) forms, in fading_generic.cpp; the
// backward returns dL/d cumsum(log_decay) as the CPU kernel does (empty without log_decay).
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_fading_generic(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& log_decay,
    const std::optional<at::Tensor>& initial_state, const std::optional<at::Tensor>& key_padding_mask,
    int64_t feature_map, bool normalize, double eps);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_fading_generic(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_final_state, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& log_decay, const at::Tensor& out,
    const at::Tensor& normalizer, const std::optional<at::Tensor>& initial_state,
    const std::optional<at::Tensor>& key_padding_mask, int64_t feature_map, bool normalize);

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_packed_generic(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens,
    const std::optional<at::Tensor>& log_decay, const std::optional<at::Tensor>& initial_state,
    int64_t feature_map, bool causal, bool normalize, double eps);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_packed_generic(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_final_state, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens, const std::optional<at::Tensor>& log_decay,
    const at::Tensor& out, const at::Tensor& normalizer, const std::optional<at::Tensor>& initial_state,
    int64_t feature_map, bool causal, bool normalize);

}  // namespace linattn
