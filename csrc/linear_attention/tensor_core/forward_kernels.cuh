// The tensor-core forward's CUDA kernel template (forward.h, one block of 8 warps per (batch,
// head[, segment, value tile]), the block program's phases separated by __syncthreads()) and the
// launch of one instance, shared by forward_cuda_kernels.cu (plain and per-token fading instances)
// and forward_channel_cuda_kernels.cu (gates per channel).
#pragma once

#include "forward.h"
#include "../../common/warp/device_block.h"
#include "launch.h"

#include <c10/cuda/CUDAException.h>

namespace linattn {
namespace tensor_core {

// kFading: a fading state's instance (decay, gates), compiled apart from the plain one; kChannels
// with it: gates per channel.
template <int DK, int DV, typename scalar_t, bool kFading, bool kChannels>
__global__ void __launch_bounds__(kThreads, 1) forward_kernel(const ForwardProblem<scalar_t> p) {
#if defined(__CUDA_ARCH__)  // (the host pass of nvcc sees the host WarpContext, without a lane)
  extern __shared__ __align__(16) unsigned char shared[];
  const warp::WarpContext context = warp::this_warp(shared);
  WarpState<DK, DV> state;
  run_forward_block<DK, DV, kFading, kChannels>(warp::DeviceBlock<WarpState<DK, DV>>{context, state}, p,
                                                static_cast<int64_t>(blockIdx.x));
#endif
}

template <int DK, int DV, typename scalar_t, bool kFading, bool kChannels = false>
void launch_instance(const ForwardProblem<scalar_t>& p, cudaStream_t stream) {
  constexpr int bytes = Layout<DK, DV, kChannels>::kBytes;
  auto* kernel = forward_kernel<DK, DV, scalar_t, kFading, kChannels>;
  // Above 48 KiB a kernel must opt in to its dynamic shared memory.
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  kernel<<<static_cast<unsigned int>(p.blocks()), kThreads, bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Gates per channel (p.gate_per_channel; feature dims up to 128): forward_channel_cuda_kernels.cu.
template <typename scalar_t>
void launch_channel_forward(const ForwardProblem<scalar_t>& p, cudaStream_t stream);

}  // namespace tensor_core
}  // namespace linattn
