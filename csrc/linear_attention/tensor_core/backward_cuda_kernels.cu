// The tensor-core backward (backward.h) as CUDA kernels: the plain and per-token fading instances
// (backward_kernels.cuh); gates per channel run backward_channel_cuda_kernels.cu's.
#include "backward_kernels.cuh"

namespace linattn {
namespace tensor_core {

template <typename scalar_t>
void launch_backward(const BackwardProblem<scalar_t>& p, cudaStream_t stream) {
  if (p.blocks() == 0) return;
  if (p.gate_per_channel) {
    launch_channel_backward(p, stream);
    return;
  }
  with_backward_head_dims(p.feature_dim, p.value_dim, [&](auto dk, auto dv) {
    constexpr int DK = decltype(dk)::value, DV = decltype(dv)::value;
    // A fading state runs its own instances (BackwardBlock's kFading).
    if (p.log_decay != nullptr) {
      launch_backward_instance<DK, DV, scalar_t, true>(p, stream);
    } else {
      launch_backward_instance<DK, DV, scalar_t, false>(p, stream);
    }
  });
}

// Each 16-bit type in its own translation unit, so that a parallel build compiles the two at
// once: this file instantiates bfloat16, backward_cuda_kernels_fp16.cu includes it for float16.
#if !defined(LINATTN_FLOAT16_INSTANCES)
template void launch_backward<c10::BFloat16>(const BackwardProblem<c10::BFloat16>&, cudaStream_t);
#else
template void launch_backward<c10::Half>(const BackwardProblem<c10::Half>&, cudaStream_t);
#endif

}  // namespace tensor_core
}  // namespace linattn
