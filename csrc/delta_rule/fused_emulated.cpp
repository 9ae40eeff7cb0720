// delta_rule_fwd_fused and delta_rule_bwd_fused on CPU tensors: the tensor-core kernels' blocks
// run through the warp-operation layer's emulation (every lane of every warp, ldmatrix and mma
// with the PTX ISA's fragment layouts, cp.async landing only at its wait, shared memory starting
// as NaN), so the tests check on any machine what the GPU will execute. Slow by design. Calls
// the kernels do not take run delta_rule_fwd's / delta_rule_bwd's CPU kernel.
#include "fused.h"
#include "fused_backward.h"
#include "tensor_core/backward_walk.h"
#include "tensor_core/forward.h"
#include "../common/warp/host_grid.h"

#include <torch/library.h>

namespace linattn {
namespace {

struct EmulatedLaunch {
  int64_t processors() const { return warp::emulated_processors(); }
  template <typename scalar_t>
  void operator()(const delta_tensor_core::DeltaForwardProblem<scalar_t>& p) const {
    if (p.gate_per_channel) {
      delta_tensor_core::with_key_dim(p.key_dim, [&](auto dk) {
        forward_block<decltype(dk)::value, delta_tensor_core::kChannelValueTile, false, true>(p);
      });
      return;
    }
    delta_tensor_core::with_head_dims(p.key_dim, p.value_dim, [&](auto dk, auto dv) {
      forward_block<decltype(dk)::value, decltype(dv)::value, false, false>(p);
    });
  }
  // The backward's two walks, 64 value columns a block: the forward's keeping instance and the
  // backward walk.
  template <typename scalar_t>
  void forward_keeping(const delta_tensor_core::DeltaForwardProblem<scalar_t>& p) const {
    delta_tensor_core::with_key_dim(p.key_dim, [&](auto dk) {
      constexpr int DK = decltype(dk)::value, DV = delta_tensor_core::kWalkValueTile;
      if (p.gate_per_channel) {
        forward_block<DK, DV, true, true>(p);
      } else {
        forward_block<DK, DV, true, false>(p);
      }
    });
  }
  template <typename scalar_t>
  void backward_walk(const delta_tensor_core::DeltaForwardProblem<scalar_t>& p) const {
    delta_tensor_core::with_key_dim(p.key_dim, [&](auto dk) {
      if (p.gate_per_channel) {
        walk_block<decltype(dk)::value, true>(p);
      } else {
        walk_block<decltype(dk)::value, false>(p);
      }
    });
  }

  template <int DK, int DV, bool kKeep, bool kChannels, typename scalar_t>
  static void forward_block(const delta_tensor_core::DeltaForwardProblem<scalar_t>& p) {
    warp::emulate_grid<delta_tensor_core::DeltaState<DK, DV>>(
        delta_tensor_core::kWarps, p.blocks(), delta_tensor_core::DeltaLayout<DK, DV, kChannels>::kBytes,
        [&](const auto& exec, int64_t block) {
          delta_tensor_core::run_delta_forward_block<DK, DV, kKeep, kChannels>(exec, p, block);
        });
  }
  template <int DK, bool kChannels, typename scalar_t>
  static void walk_block(const delta_tensor_core::DeltaForwardProblem<scalar_t>& p) {
    warp::emulate_grid<delta_tensor_core::DeltaState<DK, delta_tensor_core::kWalkValueTile>>(
        delta_tensor_core::kWarps, p.blocks(), delta_tensor_core::DeltaWalkLayout<DK, kChannels>::kBytes,
        [&](const auto& exec, int64_t block) {
          delta_tensor_core::run_delta_backward_walk_block<DK, kChannels>(exec, p, block);
        });
  }
};

std::tuple<at::Tensor, at::Tensor> forward_emulated(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    const at::Tensor& beta, const std::optional<at::Tensor>& log_gate,
                                                    const std::optional<at::Tensor>& initial_state,
                                                    const std::optional<at::Tensor>& cu_seqlens, bool causal,
                                                    double scale, bool normalize_qk) {
  auto result = delta_fused::forward(q, k, v, beta, log_gate, initial_state, cu_seqlens, causal, scale, normalize_qk,
                                     warp::emulated_shared_bytes(), EmulatedLaunch{});
  if (result.has_value()) return *result;
  return delta_fused::forward_elsewhere(q, k, v, beta, log_gate, initial_state, cu_seqlens, causal, scale,
                                        normalize_qk);
}

delta_fused::Gradients backward_emulated(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_final_state,
                                         const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                         const at::Tensor& beta, const std::optional<at::Tensor>& log_gate,
                                         const std::optional<at::Tensor>& initial_state,
                                         const std::optional<at::Tensor>& cu_seqlens, bool causal, double scale,
                                         bool normalize_qk) {
  auto result = delta_fused::backward(grad_out, grad_final_state, q, k, v, beta, log_gate, initial_state, cu_seqlens,
                                      causal, scale, normalize_qk, warp::emulated_shared_bytes(), EmulatedLaunch{});
  if (result.has_value()) return *result;
  return delta_fused::backward_elsewhere(grad_out, grad_final_state, q, k, v, beta, log_gate, initial_state,
                                         cu_seqlens, causal, scale, normalize_qk);
}

}  // namespace

TORCH_LIBRARY_IMPL(linattn, CPU, m) {
  m.impl("delta_rule_fwd_fused", &forward_emulated);
  m.impl("delta_rule_bwd_fused", &backward_emulated);
}

}  // namespace linattn
