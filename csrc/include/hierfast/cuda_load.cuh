// Element -> double loads for the CUDA kernels that accumulate in float64 whatever the
// input dtype (csrc/cuda/center.cu, csrc/cuda/channel_topk.cu).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace hierfast::cuda {

__device__ __forceinline__ double ld(const float* p) { return (double)*p; }
__device__ __forceinline__ double ld(const double* p) { return *p; }
__device__ __forceinline__ double ld(const __half* p) { return (double)__half2float(*p); }
__device__ __forceinline__ double ld(const __nv_bfloat16* p) { return (double)__bfloat162float(*p); }

}  // namespace hierfast::cuda
