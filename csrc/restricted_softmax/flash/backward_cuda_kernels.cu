// The flash engine's backward (backward.h) as two CUDA kernels: key blocks (dK, dV) and query
// blocks (dQ), 4 warps each (8 at D = 256: BackwardShape), the block program's phases separated by
// __syncthreads().
#include "backward.h"
#include "launch.h"
#include "../../common/warp/device_block.h"

#include <c10/cuda/CUDAException.h>

namespace linattn {
namespace flash {
namespace {

template <typename Block, typename scalar_t>
__global__ void __launch_bounds__(Block::kThreads, Block::Shape::kMinBlocks) backward_kernel(const FlashProblem<scalar_t> p,
                                                            const FlashGradients<scalar_t> g) {
#if defined(__CUDA_ARCH__)  // (the host pass of nvcc sees the host WarpContext, without a lane)
  extern __shared__ __align__(16) unsigned char shared[];
  const warp::WarpContext context = warp::this_warp(shared);
  typename Block::State state;
  run_backward_block<Block>(warp::DeviceBlock<typename Block::State>{context, state}, p, g,
                            static_cast<int64_t>(blockIdx.x));
#endif
}

template <typename Block, typename scalar_t>
void launch_blocks(const FlashProblem<scalar_t>& p, const FlashGradients<scalar_t>& g, int64_t blocks, int bytes,
                   cudaStream_t stream) {
  if (blocks == 0) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(backward_kernel<Block, scalar_t>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      bytes));
  backward_kernel<Block, scalar_t><<<static_cast<unsigned int>(blocks), Block::kThreads, bytes, stream>>>(p, g);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

template <typename scalar_t>
void launch_backward(const FlashProblem<scalar_t>& p, const FlashGradients<scalar_t>& g, int buffers,
                     cudaStream_t stream) {
  with_instance(p.head_dim, p.value_dim, buffers, [&](auto d, auto n) {
    constexpr int D = decltype(d)::value, Buffers = decltype(n)::value;
    constexpr int bytes = BackwardLayout<D, Buffers>::kBytes;
    launch_blocks<KeyBlock<scalar_t, D, Buffers>>(p, g, p.key_blocks(), bytes, stream);
    launch_blocks<QueryBlock<scalar_t, D, Buffers>>(p, g, p.blocks(), bytes, stream);
  });
}

// Each 16-bit type in its own translation unit, so that a parallel build compiles the two at
// once: this file instantiates bfloat16, backward_cuda_kernels_fp16.cu includes it for float16.
#if !defined(LINATTN_FLOAT16_INSTANCES)
template void launch_backward<c10::BFloat16>(const FlashProblem<c10::BFloat16>&, const FlashGradients<c10::BFloat16>&,
                                             int, cudaStream_t);
#else
template void launch_backward<c10::Half>(const FlashProblem<c10::Half>&, const FlashGradients<c10::Half>&, int,
                                         cudaStream_t);
#endif

}  // namespace flash
}  // namespace linattn
