// The delta rule's tensor-core kernels for gates per key channel (Kimi Delta Attention; the
// kChannels instances of forward.h and backward_walk.h, value tiles of 64 columns) on CUDA, in a
// translation unit of their own so that a parallel build compiles them beside the others.
#include "kernels.cuh"

namespace linattn {
namespace delta_tensor_core {

template <typename scalar_t>
void launch_channel_forward(const DeltaForwardProblem<scalar_t>& p, bool keep, cudaStream_t stream) {
  if (p.blocks() == 0) return;
  with_key_dim(p.key_dim, [&](auto dk) {
    constexpr int DK = decltype(dk)::value;
    if (keep) {
      launch_forward_dims<DK, kChannelValueTile, true, true>(p, stream);
    } else {
      launch_forward_dims<DK, kChannelValueTile, false, true>(p, stream);
    }
  });
}

template <typename scalar_t>
void launch_channel_backward_walk(const DeltaForwardProblem<scalar_t>& p, cudaStream_t stream) {
  if (p.blocks() == 0) return;
  with_key_dim(p.key_dim, [&](auto dk) { launch_walk_dims<decltype(dk)::value, true>(p, stream); });
}

// bfloat16 here, float16 in channel_cuda_kernels_fp16.cu (as the forward's kernels).
#if !defined(LINATTN_FLOAT16_INSTANCES)
template void launch_channel_forward<c10::BFloat16>(const DeltaForwardProblem<c10::BFloat16>&, bool, cudaStream_t);
template void launch_channel_backward_walk<c10::BFloat16>(const DeltaForwardProblem<c10::BFloat16>&, cudaStream_t);
#else
template void launch_channel_forward<c10::Half>(const DeltaForwardProblem<c10::Half>&, bool, cudaStream_t);
template void launch_channel_backward_walk<c10::Half>(const DeltaForwardProblem<c10::Half>&, cudaStream_t);
#endif

}  // namespace delta_tensor_core
}  // namespace linattn
