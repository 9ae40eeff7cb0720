// The device-generic restricted softmax for window patterns (sliding windows, dilation, Longformer's
// global tokens, key padding, segments): whole tiles of query blocks per ATen call instead of a host
// loop over blocks, so a call issues a number of kernel launches that does not grow with T (until a
// tile's score memory bound splits it). docs/guide/cuda.md, "The device-generic restricted softmax".
#pragma once

#include "op_checks.h"

#include <ATen/ATen.h>

#include <tuple>

namespace linattn::restricted_generic {

// out (q's dtype) and lse (accumulate type) of a window pattern (no layout).
std::tuple<at::Tensor, at::Tensor> window_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  double scale, const WindowAttentionShape& s,
                                                  const RestrictedPattern& p);

// dq, dk, dv (q's dtype) of a window pattern and the forget gates' gradient (the accumulate type;
// empty without them); grad_lse (nullable) is lse's cotangent.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> window_backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, double scale, const WindowAttentionShape& s,
    const RestrictedPattern& p);

}  // namespace linattn::restricted_generic
