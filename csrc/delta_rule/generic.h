// The device-generic delta rule's parts that the tensor-core backward (fused_backward.h) shares:
// the chunk quantities that do not depend on the state, computed for every chunk at once, and the
// assembly of every gradient once the state's two walks are known (generic.cpp).
#pragma once

#include "../common/channel_halves.h"

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <utility>

namespace linattn {
namespace delta_generic {

using Optional = std::optional<at::Tensor>;
using Gradients = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The chunks of one (batch of) sequence(s) in the accumulation dtype, (B, H, n, C, ...): C = 64
// (or T when shorter; with per-channel gates the next power of two, for ChannelHalves), the rows
// padded with zeros to n·C. G the cumulative log-gates, A, the UT transform's W and U, P = Q Kᵀ ⊙ Γ
// masked (causal), and the decays (generic.cpp says each). Gates per token make row factors
// (B, H, n, C) and Γ one matrix per chunk; gates per key channel (B, H, T, dk) make factors
// (B, H, n, C, dk) and pair weights that differ channel by channel (`halves`; gamma undefined).
struct Chunks {
  int64_t length = 0, chunk = 0, count = 0;
  bool per_channel = false;
  at::Tensor q, k, v, beta, G, eG, gamma, Bkk, A, M, W, U, P, decay, Kt, lower, strict;
  at::Tensor last_fade;   // e^{G_last}: (B, H, n, 1), or (B, H, n, 1, dk) per channel
  at::Tensor state_fade;  // the same as a factor of the state (B, H, n, dk, dv): (…, 1, 1) or (…, dk, 1)
  ChannelHalves halves;

  // A row factor (B, H, n, C[, dk]) against rows (B, H, n, C, d): (…, C, 1) per token, (…, C, dk) per channel.
  at::Tensor rows(const at::Tensor& factor) const { return per_channel ? factor : factor.unsqueeze(-1); }
  // x (B, H, n, C, dk) reduced to the gates' shape: summed over the channels per token, as is per channel.
  at::Tensor to_gates(const at::Tensor& x) const { return per_channel ? x : x.sum(-1); }
};

// (B, H, T, ...) → (B, H, n, C, ...) after padding T to n·C rows of zeros: a padded row has
// β = 0 and g = 0, so it changes no state, and its output is cut off.
at::Tensor to_chunks(const at::Tensor& x, int64_t chunk, int64_t count, int64_t pad);
at::Tensor from_chunks(const at::Tensor& x, int64_t length);

Chunks prepare(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta,
               const Optional& log_gate, bool causal);

// x · (Σ x² + 1e-6)^{-1/2} per row in the accumulation dtype, and that factor (…, 1).
std::pair<at::Tensor, at::Tensor> normalized(const at::Tensor& x);
// The gradient of the raw rows from that of the normalised ones x̂: r (dx̂ − x̂ (x̂ · dx̂)).
at::Tensor unnormalized_gradient(const at::Tensor& grad, const at::Tensor& xhat, const at::Tensor& r);

// The state's walks over the chunks: the state entering every chunk and the gradient of the state
// leaving it (B, H, n, dk, dv), the pseudo-values u and their gradient du (B, H, n, C, dv).
struct Walks {
  at::Tensor entering, u, leaving, du;
};

// Every gradient from the walks, for all chunks at once: dO the output's gradient times the scale
// (in chunks when causal), grad_q the non-causal query gradient (dO S_Tᵀ, the caller's), the
// gradient of the initial state passed through. Returns (dq, dk, dv in out_type; dβ in beta_type;
// dg in the gate's dtype, empty without one; grad_initial).
Gradients assemble_gradients(const Chunks& c, const Walks& walks, const at::Tensor& dO, at::Tensor grad_q,
                             bool causal, const Optional& log_gate, at::ScalarType out_type,
                             at::ScalarType beta_type, const at::Tensor& grad_initial);

}  // namespace delta_generic
}  // namespace linattn
