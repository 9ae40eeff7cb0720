// The delta rule's tensor-core kernels (forward.h, backward_walk.h) as CUDA kernels, and the
// launch of one instance: one block of 8 warps per (batch or sequence, head, value tile), the block
// programs' phases separated by __syncthreads(). Included by the translation units that
// instantiate them (forward_cuda_kernels.cu, backward_walk_cuda_kernels.cu: gates per token or
// none; channel_cuda_kernels.cu: gates per key channel), each 16-bit type in a unit of its own.
#pragma once

#include "backward_walk.h"
#include "forward.h"
#include "launch.h"
#include "../../common/warp/device_block.h"

#include <c10/cuda/CUDAException.h>

namespace linattn {
namespace delta_tensor_core {
namespace {

template <int DK, int DV, typename scalar_t, bool kKeep, bool kChannels>
__global__ void __launch_bounds__(kThreads, 1) delta_forward_kernel(const DeltaForwardProblem<scalar_t> p) {
#if defined(__CUDA_ARCH__)  // (the host pass of nvcc sees the host WarpContext, without a lane)
  extern __shared__ __align__(16) unsigned char shared[];
  const warp::WarpContext context = warp::this_warp(shared);
  DeltaState<DK, DV> state;
  run_delta_forward_block<DK, DV, kKeep, kChannels>(warp::DeviceBlock<DeltaState<DK, DV>>{context, state}, p,
                                                    static_cast<int64_t>(blockIdx.x));
#endif
}

template <int DK, typename scalar_t, bool kChannels>
__global__ void __launch_bounds__(kThreads, 1) delta_backward_walk_kernel(const DeltaForwardProblem<scalar_t> p) {
#if defined(__CUDA_ARCH__)
  extern __shared__ __align__(16) unsigned char shared[];
  const warp::WarpContext context = warp::this_warp(shared);
  DeltaState<DK, kWalkValueTile> state;
  run_delta_backward_walk_block<DK, kChannels>(warp::DeviceBlock<DeltaState<DK, kWalkValueTile>>{context, state}, p,
                                               static_cast<int64_t>(blockIdx.x));
#endif
}

// One launch of an instance (above 48 KiB a kernel must opt in to its dynamic shared memory).
template <int DK, int DV, bool kKeep, bool kChannels, typename scalar_t>
void launch_forward_dims(const DeltaForwardProblem<scalar_t>& p, cudaStream_t stream) {
  constexpr int bytes = DeltaLayout<DK, DV, kChannels>::kBytes;
  const auto kernel = delta_forward_kernel<DK, DV, scalar_t, kKeep, kChannels>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  kernel<<<static_cast<unsigned int>(p.blocks()), kThreads, bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int DK, bool kChannels, typename scalar_t>
void launch_walk_dims(const DeltaForwardProblem<scalar_t>& p, cudaStream_t stream) {
  constexpr int bytes = DeltaWalkLayout<DK, kChannels>::kBytes;
  const auto kernel = delta_backward_walk_kernel<DK, scalar_t, kChannels>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  kernel<<<static_cast<unsigned int>(p.blocks()), kThreads, bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace delta_tensor_core
}  // namespace linattn
