// The tensor-core backward (backward.h) as CUDA kernels: one block of 8 warps per (batch, head)
// in each of its two launches, the block program's phases separated by __syncthreads().
#include "backward.h"
#include "../../common/warp/device_block.h"
#include "launch.h"

#include <c10/cuda/CUDAException.h>

namespace linattn {
namespace tensor_core {
namespace {

template <int DK, int DV, typename scalar_t, bool kFading>
__global__ void __launch_bounds__(kThreads, 1) query_gradient_kernel(const BackwardProblem<scalar_t> p) {
#if defined(__CUDA_ARCH__)
  extern __shared__ __align__(16) unsigned char shared[];
  const warp::WarpContext context = warp::this_warp(shared);
  QueryState<DK, DV> state;
  run_query_gradient_block<DK, DV, kFading>(warp::DeviceBlock<QueryState<DK, DV>>{context, state}, p,
                                   static_cast<int64_t>(blockIdx.x));
#endif
}

template <int DK, int DV, typename scalar_t, bool kFading>
__global__ void __launch_bounds__(kThreads, 1) query_sums_kernel(const BackwardProblem<scalar_t> p) {
#if defined(__CUDA_ARCH__)
  extern __shared__ __align__(16) unsigned char shared[];
  const warp::WarpContext context = warp::this_warp(shared);
  QueryState<DK, DV> state;
  run_query_sums_block<DK, DV, kFading>(warp::DeviceBlock<QueryState<DK, DV>>{context, state}, p,
                                        static_cast<int64_t>(blockIdx.x));
#endif
}

template <int DK, int DV, typename scalar_t, bool kFading>
__global__ void __launch_bounds__(kThreads, 1) key_value_gradient_kernel(const BackwardProblem<scalar_t> p) {
#if defined(__CUDA_ARCH__)
  extern __shared__ __align__(16) unsigned char shared[];
  const warp::WarpContext context = warp::this_warp(shared);
  KeyValueState<DK, DV> state;
  run_key_value_gradient_block<DK, DV, kFading>(warp::DeviceBlock<KeyValueState<DK, DV>>{context, state}, p,
                                       static_cast<int64_t>(blockIdx.x));
#endif
}

template <typename Kernel, typename scalar_t>
void launch_kernel(Kernel kernel, int bytes, const BackwardProblem<scalar_t>& p, cudaStream_t stream) {
  // Above 48 KiB a kernel must opt in to its dynamic shared memory.
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  kernel<<<static_cast<unsigned int>(p.blocks()), kThreads, bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

template <typename scalar_t>
void launch_backward(const BackwardProblem<scalar_t>& p, cudaStream_t stream) {
  if (p.blocks() == 0) return;
  with_backward_head_dims(p.feature_dim, p.value_dim, [&](auto dk, auto dv) {
    constexpr int DK = decltype(dk)::value, DV = decltype(dv)::value;
    constexpr int bytes = BackwardLayout<DK, DV>::kBytes;
    // A fading state runs its own instances (BackwardBlock's kFading).
    const bool fading = p.log_decay != nullptr;
    if (p.pass == BackwardPass::kQuery) {
      launch_kernel(fading ? query_gradient_kernel<DK, DV, scalar_t, true>
                           : query_gradient_kernel<DK, DV, scalar_t, false>,
                    bytes, p, stream);
    } else if (p.pass == BackwardPass::kQuerySums) {
      launch_kernel(fading ? query_sums_kernel<DK, DV, scalar_t, true> : query_sums_kernel<DK, DV, scalar_t, false>,
                    bytes, p, stream);
    } else {
      launch_kernel(fading ? key_value_gradient_kernel<DK, DV, scalar_t, true>
                           : key_value_gradient_kernel<DK, DV, scalar_t, false>,
                    bytes, p, stream);
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
