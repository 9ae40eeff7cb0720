// The device-generic restricted softmax for block layouts (block-local, BigBird, Reformer's chunks, Swin's
// windows, any layout with its bias, positions, segments and key padding): tiles of query blocks, each
// block with the list of key blocks its layout rows hold, gathered on the device, instead of a host loop
// over blocks. docs/guide/cuda.md, "The device-generic restricted softmax".
#pragma once

#include "op_checks.h"

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace linattn::restricted_generic {

// out (q's dtype) and lse (accumulate type) of a layout pattern.
std::tuple<at::Tensor, at::Tensor> layout_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  double scale, const WindowAttentionShape& s,
                                                  const RestrictedPattern& p);

// dq, dk, dv (q's dtype), the bias gradient (the bias's dtype; empty without a bias) and the forget
// gates' (the accumulate type; empty without them) of a layout pattern; grad_lse (nullable) is lse's
// cotangent.
RestrictedGradients layout_backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, double scale, const WindowAttentionShape& s,
    const RestrictedPattern& p);

}  // namespace linattn::restricted_generic
