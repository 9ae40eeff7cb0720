// The delta rule's tensor-core backward walk (backward_walk.h) as a CUDA kernel: one block of 8
// warps per (batch, head, 64 value columns), the block program's phases separated by
// __syncthreads().
#include "backward_walk.h"
#include "launch.h"
#include "../../common/warp/device_block.h"

#include <c10/cuda/CUDAException.h>

namespace linattn {
namespace delta_tensor_core {
namespace {

template <int DK, typename scalar_t>
__global__ void __launch_bounds__(kThreads, 1) delta_backward_walk_kernel(const DeltaForwardProblem<scalar_t> p) {
#if defined(__CUDA_ARCH__)  // (the host pass of nvcc sees the host WarpContext, without a lane)
  extern __shared__ __align__(16) unsigned char shared[];
  const warp::WarpContext context = warp::this_warp(shared);
  DeltaState<DK, kWalkValueTile> state;
  run_delta_backward_walk_block<DK>(warp::DeviceBlock<DeltaState<DK, kWalkValueTile>>{context, state}, p,
                                    static_cast<int64_t>(blockIdx.x));
#endif
}

template <int DK, typename scalar_t>
void launch_dims(const DeltaForwardProblem<scalar_t>& p, cudaStream_t stream) {
  constexpr int bytes = DeltaWalkLayout<DK>::kBytes;
  // Above 48 KiB a kernel must opt in to its dynamic shared memory.
  C10_CUDA_CHECK(cudaFuncSetAttribute(delta_backward_walk_kernel<DK, scalar_t>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  delta_backward_walk_kernel<DK, scalar_t><<<static_cast<unsigned int>(p.blocks()), kThreads, bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

template <typename scalar_t>
void launch_backward_walk(const DeltaForwardProblem<scalar_t>& p, cudaStream_t stream) {
  if (p.blocks() == 0) return;
  if (p.key_dim <= 64) {
    launch_dims<64>(p, stream);
  } else {
    launch_dims<128>(p, stream);
  }
}

// Each 16-bit type in its own translation unit (as the forward's kernels).
#if !defined(LINATTN_FLOAT16_INSTANCES)
template void launch_backward_walk<c10::BFloat16>(const DeltaForwardProblem<c10::BFloat16>&, cudaStream_t);
#else
template void launch_backward_walk<c10::Half>(const DeltaForwardProblem<c10::Half>&, cudaStream_t);
#endif

}  // namespace delta_tensor_core
}  // namespace linattn
