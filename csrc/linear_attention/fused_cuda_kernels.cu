// The fused linear attention kernels: one thread block per (batch, head, tile of value
// columns) runs the block program of fused_scan.h, its phases on the block's threads with a
// barrier after each. Only the kernel and its launch live here (light headers, quick nvcc).
#include "fused_launch.h"

#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace linattn {
namespace fused {
namespace {

// The block's threads run a phase, then meet at the barrier.
struct DeviceExec {
  int64_t threads;
  template <typename Phase>
  LINATTN_HD void operator()(const Phase& phase) const {
#ifdef __CUDA_ARCH__
    phase(static_cast<int64_t>(threadIdx.x));
    __syncthreads();
#endif
  }
};

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) scan_kernel(const ScanProblem<scalar_t, acc_t> p) {
  extern __shared__ unsigned char shared_bytes[];
  acc_t* shared = reinterpret_cast<acc_t*>(shared_bytes);
  run_scan_block(DeviceExec{static_cast<int64_t>(blockDim.x)}, p, static_cast<int64_t>(blockIdx.x), shared);
}

}  // namespace

template <typename scalar_t, typename acc_t>
void launch_scan(const ScanProblem<scalar_t, acc_t>& p, cudaStream_t stream) {
  const int64_t blocks = p.blocks();
  if (blocks == 0) return;
  const size_t bytes = static_cast<size_t>(p.shared_elements()) * sizeof(acc_t);
  if (bytes > 48 * 1024) {
    // Above 48 KiB a kernel must opt in to its dynamic shared memory.
    C10_CUDA_CHECK(cudaFuncSetAttribute(scan_kernel<scalar_t, acc_t>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
  scan_kernel<scalar_t, acc_t><<<static_cast<unsigned int>(blocks), kThreads, bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template void launch_scan<float, float>(const ScanProblem<float, float>&, cudaStream_t);
template void launch_scan<double, double>(const ScanProblem<double, double>&, cudaStream_t);
template void launch_scan<c10::Half, float>(const ScanProblem<c10::Half, float>&, cudaStream_t);
template void launch_scan<c10::BFloat16, float>(const ScanProblem<c10::BFloat16, float>&, cudaStream_t);

}  // namespace fused
}  // namespace linattn
