// The forget gates' tile terms and gradients in the device-generic restricted softmax (generic_forget.h).
#include "generic_forget.h"

#include "generic_tile.h"

namespace linattn::restricted_generic {
namespace {

// The positions a = row + offset and the keys, clamped into [0, T_k) (padding is hidden anyway), and
// σ (n, L, c) in `dtype`.
struct ForgetIndex {
  at::Tensor positions, keys, sign;
};

ForgetIndex forget_index(const ForgetTile& t, int64_t k_len, at::ScalarType dtype) {
  const at::Tensor positions = t.rows + t.offset;
  const at::Tensor before = t.keys.unsqueeze(1).le(positions.unsqueeze(-1));
  return {positions.clamp(0, k_len - 1), t.keys.clamp(0, k_len - 1),
          at::where(before, 1.0, -1.0).to(dtype)};
}

// x (B, H, T_k) at tokens (n, m): (B, H, n, m), or (B, 1, n, m) at each entry's own head.
at::Tensor gathered(const at::Tensor& x, const at::Tensor& tokens, const at::Tensor& heads) {
  if (heads.defined()) return at::index(x, indices({std::nullopt, heads.unsqueeze(1), tokens})).unsqueeze(1);
  return x.index_select(2, tokens.flatten()).unflatten(2, tokens.sizes());
}

// target (B, H, T_k) += values (B, H or 1, n, m) at tokens (n, m) (and heads).
void scattered_add(const at::Tensor& target, const at::Tensor& tokens, const at::Tensor& heads,
                   const at::Tensor& values) {
  if (heads.defined())
    target.index_put_(indices({std::nullopt, heads.unsqueeze(1), tokens}), values.squeeze(1), true);
  else
    target.index_put_(indices({std::nullopt, std::nullopt, tokens}), values, true);
}

}  // namespace

at::Tensor forget_terms(const at::Tensor& cumsum, const ForgetTile& tile) {
  const ForgetIndex ix = forget_index(tile, cumsum.size(2), cumsum.scalar_type());
  const at::Tensor at_rows = gathered(cumsum, ix.positions, tile.heads).unsqueeze(-1);  // (B, ·, n, L, 1)
  const at::Tensor at_keys = gathered(cumsum, ix.keys, tile.heads).unsqueeze(-2);       // (B, ·, n, 1, c)
  return (at_rows - at_keys) * ix.sign;
}

void add_forget_grads(const at::Tensor& grad, const at::Tensor& dS, const ForgetTile& tile) {
  const ForgetIndex ix = forget_index(tile, grad.size(2), dS.scalar_type());
  const at::Tensor signed_dS = dS * ix.sign;
  scattered_add(grad, ix.positions, tile.heads, signed_dS.sum(-1));
  scattered_add(grad, ix.keys, tile.heads, signed_dS.sum(-2).neg());
}

}  // namespace linattn::restricted_generic
