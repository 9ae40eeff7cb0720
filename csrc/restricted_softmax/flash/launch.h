// The flash engine's CUDA launcher (forward_cuda_kernels.cu), declared with no CUDA header beyond
// the runtime's stream type, so host code compiled without nvcc can call it.
#pragma once

#include "backward_block.h"

#include <cuda_runtime_api.h>

namespace linattn {
namespace flash {

// One block per (batch, head, query tile) on `stream`, asynchronously (CUDA-graph capturable), with
// `buffers` streamed-tile buffers (buffers_taking). Instantiated for c10::BFloat16 and c10::Half.
template <typename scalar_t>
void launch_forward(const FlashProblem<scalar_t>& p, int buffers, cudaStream_t stream);

// The backward's two launches (key blocks, then query blocks) on `stream`, asynchronously.
template <typename scalar_t>
void launch_backward(const FlashProblem<scalar_t>& p, const FlashGradients<scalar_t>& g, int buffers,
                     cudaStream_t stream);

}  // namespace flash
}  // namespace linattn
