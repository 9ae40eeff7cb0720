// The tensor-core backward's instances for gates per channel (GLA: backward_block.h's kChannels,
// feature dims up to 128, value tiles of 64: channel_value_tile) on CUDA, in a translation unit of
// their own so that a parallel build compiles them beside the others.
#include "backward_kernels.cuh"

namespace linattn {
namespace tensor_core {

template <typename scalar_t>
void launch_channel_backward(const BackwardProblem<scalar_t>& p, cudaStream_t stream) {
  with_backward_head_dims(p.feature_dim, p.value_dim, [&](auto dk, auto dv) {
    constexpr int DK = decltype(dk)::value, DV = decltype(dv)::value;
    if constexpr (DV == kChannelValueTile) launch_backward_instance<DK, DV, scalar_t, true, true>(p, stream);
  });
}

// bfloat16 here, float16 in backward_channel_cuda_kernels_fp16.cu.
#if !defined(LINATTN_FLOAT16_INSTANCES)
template void launch_channel_backward<c10::BFloat16>(const BackwardProblem<c10::BFloat16>&, cudaStream_t);
#else
template void launch_channel_backward<c10::Half>(const BackwardProblem<c10::Half>&, cudaStream_t);
#endif

}  // namespace tensor_core
}  // namespace linattn
