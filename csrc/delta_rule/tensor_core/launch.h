// The delta rule's tensor-core forward launcher (forward_cuda_kernels.cu), declared with no CUDA
// header beyond the runtime's stream type, so host code compiled without nvcc can call it.
#pragma once

#include "problem.h"

#include <cuda_runtime_api.h>

namespace linattn {
namespace delta_tensor_core {

// One block per (batch, head, value tile) on `stream`, asynchronously (CUDA-graph capturable).
// Instantiated for c10::BFloat16 and c10::Half.
template <typename scalar_t>
void launch_forward(const DeltaForwardProblem<scalar_t>& p, cudaStream_t stream);

}  // namespace delta_tensor_core
}  // namespace linattn
