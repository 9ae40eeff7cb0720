// The restricted-softmax (window, block-sparse) CPU kernels built for the x86-64 baseline
// (or any other CPU); common/cpu_isa.h chooses among the builds at run time.
#define LINATTN_ISA cpu_base
#include "../common/cpu_kernel_prelude.h"
#include "kernel.h"
#include "cpu_kernel_impl.h"
