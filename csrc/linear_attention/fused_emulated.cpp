// The fused CUDA kernels' block program (fused_scan.h) run on the CPU: every block of the grid
// with its threads emulated one after another between the barriers. Registered as the CPU
// kernel of linear_attn_{fwd,bwd}_fused, so that the tests check, on any machine, every index,
// mask and chunk boundary the GPU will execute. Slow by design (one scalar loop per thread).
#include "plain_entry.h"
#include "fused_plans.h"
#include "../common/warp/host_grid.h"
#include "../common/warp/host_settings.h"
#include "tensor_core/backward.h"
#include "tensor_core/forward.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <vector>

namespace linattn {
namespace {

// A thread block on the CPU: a phase runs for thread 0, 1, ... in turn; returning from the
// loop is the barrier.
struct HostExec {
  int64_t threads;
  template <typename Phase>
  void operator()(const Phase& phase) const {
    for (int64_t t = 0; t < threads; ++t) phase(t);
  }
};

// Blocks of a tensor-core kernel on the CPU (common/warp/host_grid.h), 8 warps each.
template <typename State, typename Program>
void emulate_blocks(int64_t blocks, int64_t shared_bytes, const Program& program) {
  warp::emulate_grid<State>(tensor_core::kWarps, blocks, shared_bytes, program);
}

struct EmulatedLaunch {
  int64_t processors() const { return warp::emulated_processors(); }

  template <typename scalar_t>
  void operator()(const tensor_core::ForwardProblem<scalar_t>& p) const {
    tensor_core::with_head_dims(p.feature_dim, p.value_dim, [&](auto dk, auto dv) {
      constexpr int DK = decltype(dk)::value, DV = decltype(dv)::value;
      if (p.gate_per_channel) {  // its own instance (feature dims up to 128: fused::channels_fit)
        if constexpr (DK <= 128) {
          emulate_blocks<tensor_core::WarpState<DK, DV>>(
              p.blocks(), tensor_core::Layout<DK, DV, true>::kBytes, [&](const auto& exec, int64_t block) {
                tensor_core::run_forward_block<DK, DV, true, true>(exec, p, block);
              });
        } else {
          TORCH_CHECK(false, "tensor-core gates per channel take feature dims up to 128, got ", p.feature_dim);
        }
        return;
      }
      emulate_blocks<tensor_core::WarpState<DK, DV>>(
          p.blocks(), tensor_core::Layout<DK, DV>::kBytes,
          [&](const auto& exec, int64_t block) {
            if (p.log_decay != nullptr) {  // its own instance, as on the GPU
              tensor_core::run_forward_block<DK, DV, true>(exec, p, block);
            } else {
              tensor_core::run_forward_block<DK, DV, false>(exec, p, block);
            }
          });
    });
  }

  template <typename scalar_t>
  void operator()(const tensor_core::BackwardProblem<scalar_t>& p) const {
    tensor_core::with_backward_head_dims(p.feature_dim, p.value_dim, [&](auto dk, auto dv) {
      constexpr int DK = decltype(dk)::value, DV = decltype(dv)::value;
      // A fading state and gates per channel run their own instances, as on the GPU.
      if (p.gate_per_channel) {
        emulate_pass<DK, DV, true, true>(p);
      } else if (p.log_decay != nullptr) {
        emulate_pass<DK, DV, true, false>(p);
      } else {
        emulate_pass<DK, DV, false, false>(p);
      }
    });
  }

  template <int DK, int DV, bool kFading, bool kChannels, typename scalar_t>
  static void emulate_pass(const tensor_core::BackwardProblem<scalar_t>& p) {
    constexpr int64_t bytes = tensor_core::BackwardLayout<DK, DV, kChannels>::kBytes;
    using QueryState = tensor_core::QueryState<DK, DV>;
    if (p.pass == tensor_core::BackwardPass::kQuerySums) {
      emulate_blocks<QueryState>(p.blocks(), bytes, [&](const auto& exec, int64_t block) {
        tensor_core::run_query_sums_block<DK, DV, kFading, kChannels>(exec, p, block);
      });
    } else if (p.pass == tensor_core::BackwardPass::kQuery) {
      emulate_blocks<QueryState>(p.blocks(), bytes, [&](const auto& exec, int64_t block) {
        tensor_core::run_query_gradient_block<DK, DV, kFading, kChannels>(exec, p, block);
      });
    } else {
      emulate_blocks<tensor_core::KeyValueState<DK, DV>>(p.blocks(), bytes, [&](const auto& exec, int64_t block) {
        tensor_core::run_key_value_gradient_block<DK, DV, kFading, kChannels>(exec, p, block);
      });
    }
  }

  template <typename Problem>
  void operator()(const Problem& p) const {
    using acc_t = typename Problem::acc_type;
    at::parallel_for(0, p.blocks(), 1, [&](int64_t begin, int64_t end) {
      // Shared memory starts as NaN, as garbage would on a GPU: a read before a write shows.
      std::vector<acc_t> shared(p.shared_elements());
      for (int64_t block = begin; block < end; ++block) {
        std::fill(shared.begin(), shared.end(), std::numeric_limits<acc_t>::quiet_NaN());
        fused::run_scan_block(HostExec{fused::kThreads}, p, block, shared.data());
      }
    });
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_emulated(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& initial_state, const std::optional<at::Tensor>& key_padding_mask,
    int64_t feature_map, bool causal, bool normalize, double eps) {
  auto result = fused::forward(q, k, v, initial_state, key_padding_mask, feature_map, causal, normalize,
                               eps, warp::emulated_shared_bytes(), EmulatedLaunch{});
  TORCH_CHECK(result.has_value(), kLinearAttentionOp, ": head dims ", q.size(3), " and ", v.size(3),
              " need more shared memory than a fused CUDA block has");
  return *result;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_emulated(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_final_state,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& normalizer, const std::optional<at::Tensor>& initial_state,
    const std::optional<at::Tensor>& key_padding_mask, int64_t feature_map, bool causal,
    bool normalize, const std::optional<at::Tensor>& final_state) {
  auto result = fused::backward(grad_out, grad_final_state, q, k, v, out, normalizer, initial_state,
                                key_padding_mask, feature_map, causal, normalize, final_state,
                                warp::emulated_shared_bytes(),
                                EmulatedLaunch{});
  TORCH_CHECK(result.has_value(), kLinearAttentionOp, ": head dims ", q.size(3), " and ", v.size(3),
              " need more shared memory than a fused CUDA block has");
  return *result;
}

// A fading state and/or packed sequences on the emulated tensor cores, or nothing where they do not take the call.
std::optional<std::tuple<at::Tensor, at::Tensor, at::Tensor>> extended_forward_emulated(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& initial_state, const std::optional<at::Tensor>& key_padding_mask,
    int64_t feature_map, bool causal, bool normalize, double eps, const std::optional<at::Tensor>& log_decay,
    const std::optional<at::Tensor>& cu_seqlens) {
  return fused::forward(q, k, v, initial_state, key_padding_mask, feature_map, causal, normalize, eps,
                        warp::emulated_shared_bytes(), EmulatedLaunch{}, log_decay, cu_seqlens);
}

// Their backward, or nothing where the tensor cores do not take the call.
std::optional<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>> extended_backward_emulated(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_final_state, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& normalizer,
    const std::optional<at::Tensor>& initial_state, const std::optional<at::Tensor>& key_padding_mask,
    int64_t feature_map, bool causal, bool normalize, const std::optional<at::Tensor>& final_state,
    const std::optional<at::Tensor>& log_decay, const std::optional<at::Tensor>& cu_seqlens) {
  return fused::extended_backward(grad_out, grad_final_state, q, k, v, out, normalizer, initial_state,
                                   key_padding_mask, feature_map, causal, normalize, final_state, log_decay, cu_seqlens,
                                   warp::emulated_shared_bytes(), EmulatedLaunch{});
}

constexpr char kImplementation[] = "fused kernels' emulation";

}  // namespace

TORCH_LIBRARY_IMPL(linattn, CPU, m) {
  m.impl("linear_attn_fwd_fused", &fused_forward<&forward_emulated, &extended_forward_emulated>);
  m.impl("linear_attn_bwd_fused", &fused_backward<&backward_emulated, &extended_backward_emulated, kImplementation>);
}

}  // namespace linattn
