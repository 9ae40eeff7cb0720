// The delta rule's tensor-core forward (forward.h) as a CUDA kernel: one block of 8 warps per
// (batch, head, value tile), the block program's phases separated by __syncthreads().
#include "forward.h"
#include "launch.h"
#include "../../common/warp/device_block.h"

#include <c10/cuda/CUDAException.h>

namespace linattn {
namespace delta_tensor_core {
namespace {

template <int DK, int DV, typename scalar_t, bool kKeep>
__global__ void __launch_bounds__(kThreads, 1) delta_forward_kernel(const DeltaForwardProblem<scalar_t> p) {
#if defined(__CUDA_ARCH__)  // (the host pass of nvcc sees the host WarpContext, without a lane)
  extern __shared__ __align__(16) unsigned char shared[];
  const warp::WarpContext context = warp::this_warp(shared);
  DeltaState<DK, DV> state;
  run_delta_forward_block<DK, DV, kKeep>(warp::DeviceBlock<DeltaState<DK, DV>>{context, state}, p,
                                  static_cast<int64_t>(blockIdx.x));
#endif
}

template <int DK, int DV, bool kKeep = false, typename scalar_t>
void launch_dims(const DeltaForwardProblem<scalar_t>& p, cudaStream_t stream) {
  constexpr int bytes = DeltaLayout<DK, DV>::kBytes;
  // Above 48 KiB a kernel must opt in to its dynamic shared memory.
  C10_CUDA_CHECK(cudaFuncSetAttribute(delta_forward_kernel<DK, DV, scalar_t, kKeep>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  delta_forward_kernel<DK, DV, scalar_t, kKeep>
      <<<static_cast<unsigned int>(p.blocks()), kThreads, bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

template <typename scalar_t>
void launch_forward(const DeltaForwardProblem<scalar_t>& p, cudaStream_t stream) {
  if (p.blocks() == 0) return;
  with_head_dims(p.key_dim, p.value_dim,
                 [&](auto dk, auto dv) { launch_dims<decltype(dk)::value, decltype(dv)::value>(p, stream); });
}

template <typename scalar_t>
void launch_forward_keeping(const DeltaForwardProblem<scalar_t>& p, cudaStream_t stream) {
  if (p.blocks() == 0) return;
  if (padded_key_dim(p.key_dim) == 64) {
    launch_dims<64, kWalkValueTile, true>(p, stream);
  } else {
    launch_dims<128, kWalkValueTile, true>(p, stream);
  }
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
