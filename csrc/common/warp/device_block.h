// A thread block on the GPU for kernels written on the warp-operation layer (host_block.h is its
// CPU twin): `exec(phase)` runs phase(this thread's warp context, its warp state), then
// __syncthreads() (the barrier between phases). Device code only.
#pragma once

#include "lanes.h"

namespace linattn {
namespace warp {

template <typename State>
struct DeviceBlock {
  const WarpContext& context;
  State& state;
  template <typename Phase>
  __device__ void operator()(const Phase& phase) const {
    phase(context, state);
    __syncthreads();
  }
};

#if defined(__CUDA_ARCH__)
// This thread's warp context over the block's dynamic shared memory.
__device__ inline WarpContext this_warp(unsigned char* shared) {
  WarpContext context;
  context.shared = shared;
  // (Not broadcast as warp-uniform here: kernels that branch on it ask for warp::uniform where
  // it pays; known everywhere, it raised the backward's register pressure into spills.)
  context.warp = static_cast<int>(threadIdx.x) / kWarpSize;
  context.lane = static_cast<int>(threadIdx.x) % kWarpSize;
  return context;
}
#endif

}  // namespace warp
}  // namespace linattn
