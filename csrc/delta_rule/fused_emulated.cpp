// delta_rule_fwd_fused on CPU tensors: the tensor-core forward's blocks run through the
// warp-operation layer's emulation (every lane of every warp, ldmatrix and mma with the PTX ISA's
// fragment layouts, cp.async landing only at its wait, shared memory starting as NaN), so the
// tests check on any machine what the GPU will execute. Slow by design. Calls the kernel does not
// take run delta_rule_fwd's CPU kernel.
#include "fused.h"
#include "tensor_core/forward.h"
#include "../common/warp/host_grid.h"

#include <torch/library.h>

namespace linattn {
namespace {

struct EmulatedLaunch {
  int64_t processors() const { return warp::emulated_processors(); }
  template <typename scalar_t>
  void operator()(const delta_tensor_core::DeltaForwardProblem<scalar_t>& p) const {
    delta_tensor_core::with_head_dims(p.key_dim, p.value_dim, [&](auto dk, auto dv) {
      constexpr int DK = decltype(dk)::value, DV = decltype(dv)::value;
      warp::emulate_grid<delta_tensor_core::DeltaState<DK, DV>>(
          delta_tensor_core::kWarps, p.blocks(), delta_tensor_core::DeltaLayout<DK, DV>::kBytes,
          [&](const auto& exec, int64_t block) { delta_tensor_core::run_delta_forward_block<DK, DV>(exec, p, block); });
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

}  // namespace

TORCH_LIBRARY_IMPL(linattn, CPU, m) { m.impl("delta_rule_fwd_fused", &forward_emulated); }

}  // namespace linattn
