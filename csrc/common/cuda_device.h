// What the current CUDA device offers a kernel launch, asked of the runtime (not ATen's device
// properties: their header pulls in cuBLAS and cuSPARSE, which a minimal toolkit lacks). For the
// CUDA-only host sources (*cuda*.cpp).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace linattn {

// The shared memory a block may opt in to on the current device.
inline int64_t shared_memory_per_block() {
  int device = 0, bytes = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return bytes;
}

// The current device's SMs.
inline int64_t multiprocessors() {
  int device = 0, count = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

}  // namespace linattn
