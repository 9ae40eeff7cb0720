// LINATTN_HD marks code that runs on the CPU and in CUDA kernels alike (the fused CUDA kernels'
// block programs, which the CPU tests run through an emulation of the thread block).
#pragma once

#if defined(__CUDACC__)
#define LINATTN_HD __host__ __device__
#else
#define LINATTN_HD
#endif

// Fully unrolls the next loop in device code, where a loop over a register array must unroll for
// the array to stay in registers (an array indexed at run time goes to local memory).
#if defined(__CUDA_ARCH__)
#define LINATTN_UNROLL _Pragma("unroll")
#else
#define LINATTN_UNROLL
#endif

// Keeps the next loop rolled in device code: a rare path whose unrolled body would hold more
// registers live than the kernel has (the tensor-core kernels' pair-by-pair diagonal blocks).
#if defined(__CUDA_ARCH__)
#define LINATTN_NO_UNROLL _Pragma("unroll 1")
#else
#define LINATTN_NO_UNROLL
#endif

// Unrolls the next loop four times in device code: a loop of independent global loads keeps four
// in flight without holding a register per iteration of the whole loop live beside a kernel's
// state (fully unrolled, the 64 rows of a chunk's gate loads cost the delta rule's walk 50).
#if defined(__CUDA_ARCH__)
#define LINATTN_UNROLL_BY_4 _Pragma("unroll 4")
#else
#define LINATTN_UNROLL_BY_4
#endif

// Inlines a helper in device code even where it is called more than once: one that takes a
// register array by reference and is not inlined passes the array through local memory.
#if defined(__CUDACC__)
#define LINATTN_INLINE __forceinline__
#else
#define LINATTN_INLINE inline
#endif
