// The flash engine's forward (forward.h) as a CUDA kernel: one block of 4 warps per (batch, head,
// query tile), the block program's phases separated by __syncthreads().
#include "forward.h"
#include "launch.h"
#include "../../common/warp/device_block.h"

#include <c10/cuda/CUDAException.h>

namespace linattn {
namespace flash {
namespace {

// Blocks an SM holds by shared memory (H100: 227 KiB), which the registers are budgeted for.
template <int D>
constexpr int kBlocksPerSM = D == 64 ? 3 : D == 128 ? 2 : 1;

template <int D, int Buffers, typename scalar_t>
__global__ void __launch_bounds__(kThreads, kBlocksPerSM<D>) forward_kernel(const FlashProblem<scalar_t> p) {
#if defined(__CUDA_ARCH__)  // (the host pass of nvcc sees the host WarpContext, without a lane)
  extern __shared__ __align__(16) unsigned char shared[];
  const warp::WarpContext context = warp::this_warp(shared);
  WarpState<D> state;
  run_forward_block<D, Buffers>(warp::DeviceBlock<WarpState<D>>{context, state}, p,
                                static_cast<int64_t>(blockIdx.x));
#endif
}

template <int D, int Buffers, typename scalar_t>
void launch_instance(const FlashProblem<scalar_t>& p, cudaStream_t stream) {
  constexpr int bytes = Layout<D, Buffers>::kBytes;
  auto* kernel = forward_kernel<D, Buffers, scalar_t>;
  // Above 48 KiB a kernel must opt in to its dynamic shared memory.
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  kernel<<<static_cast<unsigned int>(p.blocks()), kThreads, bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

template <typename scalar_t>
void launch_forward(const FlashProblem<scalar_t>& p, int buffers, cudaStream_t stream) {
  if (p.blocks() == 0) return;
  with_instance(p.head_dim, p.value_dim, buffers, [&](auto d, auto n) {
    launch_instance<decltype(d)::value, decltype(n)::value>(p, stream);
  });
}

// Each 16-bit type in its own translation unit, so that a parallel build compiles the two at
// once: this file instantiates bfloat16, forward_cuda_kernels_fp16.cu includes it for float16.
#if !defined(LINATTN_FLOAT16_INSTANCES)
template void launch_forward<c10::BFloat16>(const FlashProblem<c10::BFloat16>&, int, cudaStream_t);
#else
template void launch_forward<c10::Half>(const FlashProblem<c10::Half>&, int, cudaStream_t);
#endif

}  // namespace flash
}  // namespace linattn
