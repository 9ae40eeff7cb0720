// LINATTN_HD marks code that runs on the CPU and in CUDA kernels alike (the fused CUDA kernels'
// block programs, which the CPU tests run through an emulation of the thread block).
#pragma once

#if defined(__CUDACC__)
#define LINATTN_HD __host__ __device__
#else
#define LINATTN_HD
#endif
