// backward_walk_cuda_kernels.cu's float16 instances, in a translation unit of their own (the bfloat16
// ones are backward_walk_cuda_kernels.cu's): a parallel build compiles the two at once.
#define LINATTN_FLOAT16_INSTANCES
#include "backward_walk_cuda_kernels.cu"
