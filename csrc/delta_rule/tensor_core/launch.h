// The delta rule's tensor-core launchers (forward_cuda_kernels.cu, backward_walk_cuda_kernels.cu,
// channel_cuda_kernels.cu), declared with no CUDA header beyond the runtime's stream type, so host
// code compiled without nvcc can call them.
#pragma once

#include "problem.h"

#include <cuda_runtime_api.h>

namespace linattn {
namespace delta_tensor_core {

// One block per (batch, head, value tile) on `stream`, asynchronously (CUDA-graph capturable).
// Instantiated for c10::BFloat16 and c10::Half.
template <typename scalar_t>
void launch_forward(const DeltaForwardProblem<scalar_t>& p, cudaStream_t stream);

// The backward's re-walk of the state (the forward's keeping instance, 64 value columns a block):
// no outputs, the state entering every chunk and u to p.chunk_states / p.chunk_values.
template <typename scalar_t>
void launch_forward_keeping(const DeltaForwardProblem<scalar_t>& p, cudaStream_t stream);

// The backward walk (backward_walk.h): one block per (batch, head, 64 value columns), p.v holding
// grad_out, state_in / state_out the state's gradient after the last chunk / before the first.
template <typename scalar_t>
void launch_backward_walk(const DeltaForwardProblem<scalar_t>& p, cudaStream_t stream);

// Gates per key channel (p.gate_per_channel; the three above call these): the forward (or, with
// `keep`, the backward's re-walk) and the backward walk, value tiles of kChannelValueTile columns.
template <typename scalar_t>
void launch_channel_forward(const DeltaForwardProblem<scalar_t>& p, bool keep, cudaStream_t stream);
template <typename scalar_t>
void launch_channel_backward_walk(const DeltaForwardProblem<scalar_t>& p, cudaStream_t stream);

}  // namespace delta_tensor_core
}  // namespace linattn
