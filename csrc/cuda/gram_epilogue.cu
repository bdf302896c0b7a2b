// CUDA Gram epilogue (see csrc/cpu/gram_epilogue.cpp for the definition).
// Kernel 1: one block per row computes the float64 row sum. Kernel 2: one block sums the
// row sums into the total in a fixed order (deterministic), after kernel 1 on the same
// stream (no cross-block ticket: a process-wide counter broke with several GPUs or streams).
// Kernel 3: a grid-stride fused write of the centred Gram.
#include <cuda_runtime.h>

#include <string>

#include "hierfast/cuda_kernels.h"

namespace hierfast::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ double ld(const T* p) { return (double)*p; }

__device__ double block_sum(double v) {
  __shared__ double warp_sums[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : 0.0;
  if (warp == 0)
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;  // valid in thread 0
}

template <typename TIn>
__global__ void rowsum_kernel(const TIn* __restrict__ K, int64_t n, int64_t s0, int64_t s1,
                              double* __restrict__ rowsum, bool unbiased) {
  const int64_t i = blockIdx.x;
  const TIn* row = K + i * s0;
  double acc = 0.0;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x)
    if (!(unbiased && j == i)) acc += ld(row + j * s1);
  acc = block_sum(acc);
  if (threadIdx.x == 0) rowsum[i] = acc;
}

// One block of kThreads: each thread sums a fixed stride of the row sums, then the block.
__global__ void total_kernel(const double* __restrict__ rowsum, int64_t n, double* __restrict__ total) {
  double t = 0.0;
  for (int64_t k = threadIdx.x; k < n; k += blockDim.x) t += rowsum[k];
  t = block_sum(t);
  if (threadIdx.x == 0) *total = t;
}

template <typename TIn, typename TOut>
__global__ void write_kernel(const TIn* __restrict__ K, int64_t n, int64_t s0, int64_t s1,
                             TOut* __restrict__ out, const double* __restrict__ rowsum,
                             const double* __restrict__ total, bool unbiased) {
  const double a = unbiased ? 1.0 / (double)(n - 2) : 1.0 / (double)n;
  const double c = unbiased ? *total / ((double)(n - 1) * (double)(n - 2)) : *total / ((double)n * n);
  const int64_t nn = n * n;
  for (int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; idx < nn;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t i = idx / n, j = idx - i * n;
    double v = ld(K + i * s0 + j * s1) - a * rowsum[i] - a * rowsum[j] + c;
    if (unbiased && i == j) v = 0.0;
    out[idx] = (TOut)v;
  }
}

template <typename TIn, typename TOut>
std::string launch(const TIn* K, int64_t n, int64_t s0, int64_t s1, TOut* out, double* rowsum,
                   double* total, bool unbiased, cudaStream_t stream) {
  rowsum_kernel<TIn><<<(unsigned)n, kThreads, 0, stream>>>(K, n, s0, s1, rowsum, unbiased);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return cudaGetErrorString(e);
  total_kernel<<<1, kThreads, 0, stream>>>(rowsum, n, total);
  if ((e = cudaGetLastError()) != cudaSuccess) return cudaGetErrorString(e);
  const int64_t nn = n * n;
  const unsigned blocks = (unsigned)std::min<int64_t>((nn + kThreads - 1) / kThreads, 65535 * 8);
  write_kernel<TIn, TOut><<<blocks, kThreads, 0, stream>>>(K, n, s0, s1, out, rowsum, total, unbiased);
  e = cudaGetLastError();
  return e == cudaSuccess ? std::string() : std::string(cudaGetErrorString(e));
}

template <typename TIn>
std::string dispatch_out(const TIn* K, int64_t n, int64_t s0, int64_t s1, void* out, DType od,
                         double* rowsum, double* total, bool unbiased, cudaStream_t st) {
  if (od == DType::kFloat32) return launch(K, n, s0, s1, (float*)out, rowsum, total, unbiased, st);
  if (od == DType::kFloat64) return launch(K, n, s0, s1, (double*)out, rowsum, total, unbiased, st);
  return std::string("gram_epilogue: unsupported output dtype ") + dtype_name(od);
}

}  // namespace

std::string gram_epilogue(const void* gram, DType in_dtype, int64_t n, int64_t s0, int64_t s1,
                          void* out, DType out_dtype, double* rowsum, double* total,
                          bool unbiased, uintptr_t stream) {
  auto st = reinterpret_cast<cudaStream_t>(stream);
  if (in_dtype == DType::kFloat32)
    return dispatch_out((const float*)gram, n, s0, s1, out, out_dtype, rowsum, total, unbiased, st);
  if (in_dtype == DType::kFloat64)
    return dispatch_out((const double*)gram, n, s0, s1, out, out_dtype, rowsum, total, unbiased, st);
  return std::string("gram_epilogue: unsupported Gram dtype ") + dtype_name(in_dtype);
}

int device_count(std::string* err) {
  int count = 0;
  cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    *err = cudaGetErrorString(e);
    cudaGetLastError();  // clear the sticky error of a GPU-less machine
    return -1;
  }
  return count;
}

}  // namespace hierfast::cuda
