// The tensor-core forward's and backward's CUDA launchers (forward_cuda_kernels.cu,
// backward_cuda_kernels.cu), declared with no CUDA header beyond the runtime's stream type, so
// host code compiled without nvcc can call them.
#pragma once

#include "backward_problem.h"

#include <cuda_runtime_api.h>

namespace linattn {
namespace tensor_core {

// One block per (batch, head) on `stream`, asynchronously (CUDA-graph capturable). Instantiated
// for c10::BFloat16 and c10::Half.
template <typename scalar_t>
void launch_forward(const ForwardProblem<scalar_t>& p, cudaStream_t stream);

// One pass of the tensor-core backward (p.pass), a block per (batch, head), likewise.
template <typename scalar_t>
void launch_backward(const BackwardProblem<scalar_t>& p, cudaStream_t stream);

}  // namespace tensor_core
}  // namespace linattn
