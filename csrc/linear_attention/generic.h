// The device-generic linear attention (generic.cpp), callable from other kernels: the fused
// CUDA operators fall back to it for head dims too large for one block's shared memory.
#pragma once

#include "feature_map.h"

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace linattn {

// φ(x) of a fused feature map in ATen ops (elu+1 as exp(x) for x <= 0, as the CPU kernels), and
// its derivative (elu+1 and relu; the identity's is 1).
at::Tensor features(const at::Tensor& x, FeatureMap map);
at::Tensor feature_derivative(const at::Tensor& x, FeatureMap map);

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

}  // namespace linattn
