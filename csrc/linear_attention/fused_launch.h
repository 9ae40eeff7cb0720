// The fused CUDA kernels' launcher (fused_cuda_kernels.cu), declared without CUDA or ATen
// headers beyond the runtime's stream type, so the operators (fused_cuda_ops.cpp, compiled by
// the host compiler) and the kernels (nvcc) meet at this one function.
#pragma once

#include "fused_scan.h"

#include <cuda_runtime_api.h>

namespace linattn {
namespace fused {

// Runs every block of p on `stream`, asynchronously (no host synchronisation, so a CUDA graph
// can capture it). Instantiated for float, double, c10::Half and c10::BFloat16 inputs.
template <typename scalar_t, typename acc_t>
void launch_scan(const ScanProblem<scalar_t, acc_t>& p, cudaStream_t stream);

}  // namespace fused
}  // namespace linattn
