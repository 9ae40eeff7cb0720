// The delta rule's tensor-core forward (forward.h) on CUDA, gates per token or none; calls with
// gates per key channel go to channel_cuda_kernels.cu's instances.
#include "kernels.cuh"

namespace linattn {
namespace delta_tensor_core {

template <typename scalar_t>
void launch_forward(const DeltaForwardProblem<scalar_t>& p, cudaStream_t stream) {
  if (p.blocks() == 0) return;
  if (p.gate_per_channel) {
    launch_channel_forward(p, /*keep=*/false, stream);
    return;
  }
  with_head_dims(p.key_dim, p.value_dim, [&](auto dk, auto dv) {
    launch_forward_dims<decltype(dk)::value, decltype(dv)::value, false, false>(p, stream);
  });
}

template <typename scalar_t>
void launch_forward_keeping(const DeltaForwardProblem<scalar_t>& p, cudaStream_t stream) {
  if (p.blocks() == 0) return;
  if (p.gate_per_channel) {
    launch_channel_forward(p, /*keep=*/true, stream);
    return;
  }
  with_key_dim(p.key_dim, [&](auto dk) {
    launch_forward_dims<decltype(dk)::value, kWalkValueTile, true, false>(p, stream);
  });
}

// Each 16-bit type in its own translation unit, so that a parallel build compiles the two at
// once: this file instantiates bfloat16, forward_cuda_kernels_fp16.cu includes it for float16.
#if !defined(LINATTN_FLOAT16_INSTANCES)
template void launch_forward<c10::BFloat16>(const DeltaForwardProblem<c10::BFloat16>&, cudaStream_t);
template void launch_forward_keeping<c10::BFloat16>(const DeltaForwardProblem<c10::BFloat16>&, cudaStream_t);
#else
template void launch_forward<c10::Half>(const DeltaForwardProblem<c10::Half>&, cudaStream_t);
template void launch_forward_keeping<c10::Half>(const DeltaForwardProblem<c10::Half>&, cudaStream_t);
#endif

}  // namespace delta_tensor_core
}  // namespace linattn
