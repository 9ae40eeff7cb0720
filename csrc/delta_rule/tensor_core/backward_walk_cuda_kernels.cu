// The delta rule's tensor-core backward walk (backward_walk.h) on CUDA, gates per token or none;
// calls with gates per key channel go to channel_cuda_kernels.cu's instances.
#include "kernels.cuh"

namespace linattn {
namespace delta_tensor_core {

template <typename scalar_t>
void launch_backward_walk(const DeltaForwardProblem<scalar_t>& p, cudaStream_t stream) {
  if (p.blocks() == 0) return;
  if (p.gate_per_channel) {
    launch_channel_backward_walk(p, stream);
    return;
  }
  with_key_dim(p.key_dim, [&](auto dk) { launch_walk_dims<decltype(dk)::value, false>(p, stream); });
}

// Each 16-bit type in its own translation unit (as the forward's kernels).
#if !defined(LINATTN_FLOAT16_INSTANCES)
template void launch_backward_walk<c10::BFloat16>(const DeltaForwardProblem<c10::BFloat16>&, cudaStream_t);
#else
template void launch_backward_walk<c10::Half>(const DeltaForwardProblem<c10::Half>&, cudaStream_t);
#endif

}  // namespace delta_tensor_core
}  // namespace linattn
