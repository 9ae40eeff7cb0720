// The tensor-core forward (forward.h) as a CUDA kernel: one block of 8 warps per (batch, head),
// the block program's phases separated by __syncthreads().
#include "forward.h"
#include "../../common/warp/device_block.h"
#include "launch.h"

#include <c10/cuda/CUDAException.h>

namespace linattn {
namespace tensor_core {
namespace {

// kFading: a fading state's instance (decay, gates), compiled apart from the plain one.
template <int DK, int DV, typename scalar_t, bool kFading>
__global__ void __launch_bounds__(kThreads, 1) forward_kernel(const ForwardProblem<scalar_t> p) {
#if defined(__CUDA_ARCH__)  // (the host pass of nvcc sees the host WarpContext, without a lane)
  extern __shared__ __align__(16) unsigned char shared[];
  const warp::WarpContext context = warp::this_warp(shared);
  WarpState<DK, DV> state;
  run_forward_block<DK, DV, kFading>(warp::DeviceBlock<WarpState<DK, DV>>{context, state}, p,
                                     static_cast<int64_t>(blockIdx.x));
#endif
}

template <int DK, int DV, typename scalar_t, bool kFading>
void launch_instance(const ForwardProblem<scalar_t>& p, cudaStream_t stream) {
  constexpr int bytes = Layout<DK, DV>::kBytes;
  auto* kernel = forward_kernel<DK, DV, scalar_t, kFading>;
  // Above 48 KiB a kernel must opt in to its dynamic shared memory.
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  kernel<<<static_cast<unsigned int>(p.blocks()), kThreads, bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

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
