// The tensor-core forward's instances for gates per channel (GLA: forward_block.h's kChannels,
// feature dims up to 128, whose G would not fit beside a 256-wide chunk) on CUDA, in a translation
// unit of their own so that a parallel build compiles them beside the others.
#include "forward_kernels.cuh"

namespace linattn {
namespace tensor_core {

template <typename scalar_t>
void launch_channel_forward(const ForwardProblem<scalar_t>& p, cudaStream_t stream) {
  with_head_dims(p.feature_dim, p.value_dim, [&](auto dk, auto dv) {
    constexpr int DK = decltype(dk)::value, DV = decltype(dv)::value;
    if constexpr (DK <= 128) launch_instance<DK, DV, scalar_t, true, true>(p, stream);
  });
}

// bfloat16 here, float16 in forward_channel_cuda_kernels_fp16.cu.
#if !defined(LINATTN_FLOAT16_INSTANCES)
template void launch_channel_forward<c10::BFloat16>(const ForwardProblem<c10::BFloat16>&, cudaStream_t);
#else
template void launch_channel_forward<c10::Half>(const ForwardProblem<c10::Half>&, cudaStream_t);
#endif

}  // namespace tensor_core
}  // namespace linattn
