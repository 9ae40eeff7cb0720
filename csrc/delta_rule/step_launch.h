// The fused decoding step's CUDA launcher (step_cuda_kernels.cu), declared with no CUDA header
// beyond the runtime's stream type, so host code compiled without nvcc can call it.
#pragma once

#include "step_kernel.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime_api.h>

namespace linattn {
namespace delta_step {

// Asynchronously on `stream` (CUDA-graph capturable). Instantiated for float, c10::BFloat16 and
// c10::Half.
template <typename scalar_t>
void launch_step(const StepProblem<scalar_t>& p, cudaStream_t stream);

}  // namespace delta_step
}  // namespace linattn
