// The flash engine's forward (flash/forward.h) run on the CPU: each block's warps emulated lane by
// lane through the warp-operation layer, counting what they do (common/warp/emulation.h).
// Registered as the CPU kernel of restricted_softmax_fwd_fused, so that the tests check, on any
// machine, every index, mask, fragment and tile the GPU will execute. Slow by design.
#include "flash/backward.h"
#include "flash/forward.h"
#include "flash/plan.h"
#include "../common/warp/host_grid.h"

#include <torch/library.h>

namespace linattn {
namespace {

template <int D, int Buffers, typename scalar_t>
void emulate_forward(const flash::FlashProblem<scalar_t>& p) {
  warp::emulate_grid<flash::WarpState<D>>(flash::kWarps, p.blocks(), flash::Layout<D, Buffers>::kBytes,
                                          [&](const auto& exec, int64_t block) {
                                            flash::run_forward_block<D, Buffers>(exec, p, block);
                                          });
}

// Blocks [0, blocks) of one backward launch (Block: KeyBlock or QueryBlock).
template <typename Block, typename scalar_t>
void emulate_backward_blocks(const flash::FlashProblem<scalar_t>& p, const flash::FlashGradients<scalar_t>& g,
                             int64_t blocks, int64_t shared_bytes) {
  warp::emulate_grid<typename Block::State>(Block::kWarps, blocks, shared_bytes, [&](const auto& exec, int64_t block) {
    flash::run_backward_block<Block>(exec, p, g, block);
  });
}

template <int D, int Buffers, typename scalar_t>
void emulate_backward(const flash::FlashProblem<scalar_t>& p, const flash::FlashGradients<scalar_t>& g) {
  constexpr int64_t bytes = flash::BackwardLayout<D, Buffers>::kBytes;
  emulate_backward_blocks<flash::KeyBlock<scalar_t, D, Buffers>>(p, g, p.key_blocks(), bytes);
  emulate_backward_blocks<flash::QueryBlock<scalar_t, D, Buffers>>(p, g, p.blocks(), bytes);
}

std::tuple<at::Tensor, at::Tensor> forward_emulated(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    double scale, LINATTN_RESTRICTED_PATTERN_PARAMS) {
  const RestrictedPattern pattern{LINATTN_RESTRICTED_PATTERN_ARGS};
  check_restricted_inputs(q, k, v, scale, pattern);
  const int buffers = flash::buffers_taking(q, v, false, warp::emulated_shared_bytes());
  if (buffers == 0)
    return flash::unfused_forward(q, k, v, scale, LINATTN_RESTRICTED_PATTERN_ARGS);
  return flash::run_call(q, k, v, scale, pattern, [&](const auto& problem) {
    flash::with_instance(problem.head_dim, problem.value_dim, buffers, [&](auto d, auto n) {
      emulate_forward<decltype(d)::value, decltype(n)::value>(problem);
    });
  });
}

RestrictedGradients backward_emulated(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, double scale,
    LINATTN_RESTRICTED_PATTERN_PARAMS) {
  const RestrictedPattern pattern{LINATTN_RESTRICTED_PATTERN_ARGS};
  check_restricted_backward_inputs(grad_out, grad_lse, q, k, v, out, lse, scale, pattern);
  const int buffers = flash::buffers_taking(q, v, true, warp::emulated_shared_bytes());
  if (buffers == 0)
    return flash::unfused_backward(grad_out, grad_lse, q, k, v, out, lse, scale, LINATTN_RESTRICTED_PATTERN_ARGS);
  return flash::run_backward_call(grad_out, grad_lse, q, k, v, out, lse, scale, pattern,
                                  [&](const auto& problem, const auto& gradients) {
                                    flash::with_instance(problem.head_dim, problem.value_dim, buffers,
                                                         [&](auto d, auto n) {
                                                           emulate_backward<decltype(d)::value, decltype(n)::value>(
                                                               problem, gradients);
                                                         });
                                  });
}

}  // namespace

TORCH_LIBRARY_IMPL(linattn, CPU, m) {
  m.impl("restricted_softmax_fwd_fused", &forward_emulated);
  m.impl("restricted_softmax_bwd_fused", &backward_emulated);
}

}  // namespace linattn
