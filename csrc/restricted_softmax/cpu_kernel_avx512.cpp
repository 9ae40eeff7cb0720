// The restricted-softmax (window, block-sparse) CPU kernels built for AVX-512 (F, BW, VL,
// DQ); common/cpu_isa.h chooses among the builds at run time.
#define LINATTN_ISA cpu_avx512
#define LINATTN_ISA_LEVEL 2
#include "../common/cpu_kernel_prelude.h"
#include "kernel.h"

#if LINATTN_CPU_ISA_VARIANTS
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,prefer-vector-width=512")
#include "cpu_kernel_impl.h"
#pragma GCC pop_options
#endif
