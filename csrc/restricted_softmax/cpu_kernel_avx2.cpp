// The restricted-softmax (window, block-sparse) CPU kernels built for AVX2 + FMA;
// common/cpu_isa.h chooses among the builds at run time.
#define LINATTN_ISA cpu_avx2
#define LINATTN_ISA_LEVEL 1
#include "../common/cpu_kernel_prelude.h"
#include "kernel.h"

#if LINATTN_CPU_ISA_VARIANTS
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#include "cpu_kernel_impl.h"
#pragma GCC pop_options
#endif
