// The fused decoding step (step_kernel.h) as a CUDA kernel: one thread per value column, blocks of
// 128 columns of one (batch, head) each (grid: (B·H, column tiles)).
#include "step_launch.h"

#include <c10/cuda/CUDAException.h>

namespace linattn {
namespace delta_step {
namespace {

constexpr int kColumns = 128;

template <typename scalar_t>
__global__ void __launch_bounds__(kColumns) step_kernel(const StepProblem<scalar_t> p) {
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kColumns + threadIdx.x;
  if (c < p.value_dim) step_column(p, static_cast<int64_t>(blockIdx.x), c);
}

}  // namespace

template <typename scalar_t>
void launch_step(const StepProblem<scalar_t>& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned int>(p.batch * p.heads),
                  static_cast<unsigned int>((p.value_dim + kColumns - 1) / kColumns));
  step_kernel<scalar_t><<<grid, kColumns, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template void launch_step<float>(const StepProblem<float>&, cudaStream_t);
template void launch_step<c10::BFloat16>(const StepProblem<c10::BFloat16>&, cudaStream_t);
template void launch_step<c10::Half>(const StepProblem<c10::Half>&, cudaStream_t);

}  // namespace delta_step
}  // namespace linattn
