// backward_channel_cuda_kernels.cu's float16 instances, in a translation unit of their own.
#define LINATTN_FLOAT16_INSTANCES
#include "backward_channel_cuda_kernels.cu"
