// The Forgetting Transformer's forget gates in the device-generic restricted softmax: a tile's
// score terms from the cumulative log gates c (B, H, T_k), and their gradient from the tile's
// score gradients (op_checks.h's RestrictedPattern::forget_cumsum has the definition).
#pragma once

#include <ATen/ATen.h>

namespace linattn::restricted_generic {

// Where a tile's pairs read the gates: rows (n, L) and keys (n, c) as indices (padding outside
// [0, T) allowed: such pairs are hidden), offset = T_k − T_q; `heads` (n,) when each tile entry is
// one (head, query block) pair of its own (a layout with a row per head), else undefined.
struct ForgetTile {
  at::Tensor rows, keys, heads;
  int64_t offset;
};

// σ·(c_a − c_j), σ = 1 for key j <= a = row + offset, −1 past it: (B, H, n, L, c), or (B, 1, n, L, c)
// with heads; a PairBlock's bias (added after the cap, as ALiBi's terms).
at::Tensor forget_terms(const at::Tensor& cumsum, const ForgetTile& tile);

// Adds the gates' gradient from the tile's score gradients dS (the terms' shape, 0 on hidden pairs)
// into grad (B, H, T_k): σ·dS joins its row's position a and leaves its key. With
// index_put_(accumulate=True): deterministic on CUDA too.
void add_forget_grads(const at::Tensor& grad, const at::Tensor& dS, const ForgetTile& tile);

}  // namespace linattn::restricted_generic
