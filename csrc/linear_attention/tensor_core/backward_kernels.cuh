// The tensor-core backward's CUDA kernel templates (backward.h: one block of 8 warps per (batch,
// head[, segment]) in each of its launches, the block program's phases separated by
// __syncthreads()) and the launch of one instance's pass, shared by backward_cuda_kernels.cu
// (plain and per-token fading instances) and backward_channel_cuda_kernels.cu (gates per channel).
#pragma once

#include "backward.h"
#include "../../common/warp/device_block.h"
#include "launch.h"

#include <c10/cuda/CUDAException.h>

namespace linattn {
namespace tensor_core {

template <int DK, int DV, typename scalar_t, bool kFading, bool kChannels>
__global__ void __launch_bounds__(kThreads, 1) query_gradient_kernel(const BackwardProblem<scalar_t> p) {
#if defined(__CUDA_ARCH__)
  extern __shared__ __align__(16) unsigned char shared[];
  const warp::WarpContext context = warp::this_warp(shared);
  QueryState<DK, DV> state;
  run_query_gradient_block<DK, DV, kFading, kChannels>(warp::DeviceBlock<QueryState<DK, DV>>{context, state}, p,
                                                       static_cast<int64_t>(blockIdx.x));
#endif
}

template <int DK, int DV, typename scalar_t, bool kFading, bool kChannels>
__global__ void __launch_bounds__(kThreads, 1) query_sums_kernel(const BackwardProblem<scalar_t> p) {
#if defined(__CUDA_ARCH__)
  extern __shared__ __align__(16) unsigned char shared[];
  const warp::WarpContext context = warp::this_warp(shared);
  QueryState<DK, DV> state;
  run_query_sums_block<DK, DV, kFading, kChannels>(warp::DeviceBlock<QueryState<DK, DV>>{context, state}, p,
                                                   static_cast<int64_t>(blockIdx.x));
#endif
}

template <int DK, int DV, typename scalar_t, bool kFading, bool kChannels>
__global__ void __launch_bounds__(kThreads, 1) key_value_gradient_kernel(const BackwardProblem<scalar_t> p) {
#if defined(__CUDA_ARCH__)
  extern __shared__ __align__(16) unsigned char shared[];
  const warp::WarpContext context = warp::this_warp(shared);
  KeyValueState<DK, DV> state;
  run_key_value_gradient_block<DK, DV, kFading, kChannels>(warp::DeviceBlock<KeyValueState<DK, DV>>{context, state},
                                                           p, static_cast<int64_t>(blockIdx.x));
#endif
}

template <typename Kernel, typename scalar_t>
void launch_kernel(Kernel kernel, int bytes, const BackwardProblem<scalar_t>& p, cudaStream_t stream) {
  // Above 48 KiB a kernel must opt in to its dynamic shared memory.
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  kernel<<<static_cast<unsigned int>(p.blocks()), kThreads, bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Pass p.pass of the (DK, DV, kFading, kChannels) instance.
template <int DK, int DV, typename scalar_t, bool kFading, bool kChannels = false>
void launch_backward_instance(const BackwardProblem<scalar_t>& p, cudaStream_t stream) {
  constexpr int bytes = BackwardLayout<DK, DV, kChannels>::kBytes;
  if (p.pass == BackwardPass::kQuery) {
    launch_kernel(query_gradient_kernel<DK, DV, scalar_t, kFading, kChannels>, bytes, p, stream);
  } else if (p.pass == BackwardPass::kQuerySums) {
    launch_kernel(query_sums_kernel<DK, DV, scalar_t, kFading, kChannels>, bytes, p, stream);
  } else {
    launch_kernel(key_value_gradient_kernel<DK, DV, scalar_t, kFading, kChannels>, bytes, p, stream);
  }
}

// Gates per channel (p.gate_per_channel): backward_channel_cuda_kernels.cu.
template <typename scalar_t>
void launch_channel_backward(const BackwardProblem<scalar_t>& p, cudaStream_t stream);

}  // namespace tensor_core
}  // namespace linattn
