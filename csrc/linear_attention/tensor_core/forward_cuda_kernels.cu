// The tensor-core forward (forward.h) as CUDA kernels: the plain and per-token fading instances
// (forward_kernels.cuh); gates per channel run forward_channel_cuda_kernels.cu's.
#include "forward_kernels.cuh"

namespace linattn {
namespace tensor_core {
namespace {

template <int DK, int DV, typename scalar_t>
void launch_dims(const ForwardProblem<scalar_t>& p, cudaStream_t stream) {
  if (p.log_decay != nullptr) {
    launch_instance<DK, DV, scalar_t, true>(p, stream);
  } else {
    launch_instance<DK, DV, scalar_t, false>(p, stream);
  }
}

}  // namespace

template <typename scalar_t>
void launch_forward(const ForwardProblem<scalar_t>& p, cudaStream_t stream) {
  if (p.blocks() == 0) return;
  if (p.gate_per_channel) {
    launch_channel_forward(p, stream);
    return;
  }
  with_head_dims(p.feature_dim, p.value_dim,
                 [&](auto dk, auto dv) { launch_dims<decltype(dk)::value, decltype(dv)::value>(p, stream); });
}

// Each 16-bit type in its own translation unit, so that a parallel build compiles the two at
// once: this file instantiates bfloat16, forward_cuda_kernels_fp16.cu includes it for float16.
#if !defined(LINATTN_FLOAT16_INSTANCES)
template void launch_forward<c10::BFloat16>(const ForwardProblem<c10::BFloat16>&, cudaStream_t);
#else
template void launch_forward<c10::Half>(const ForwardProblem<c10::Half>&, cudaStream_t);
#endif

}  // namespace tensor_core
}  // namespace linattn
