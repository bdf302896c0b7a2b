// CUDA column-centring: column sums in float64 (each block owns 32 columns and
// a slice of rows; partial sums combined with float64 atomics), then a fused
// cast + subtract + write. See csrc/cpu/center.cpp for the definition.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "hierfast/cuda_kernels.h"
#include "hierfast/cuda_load.cuh"

namespace hierfast::cuda {
namespace {

constexpr int kCols = 32, kRows = 8, kRowsPerBlock = 256;

template <typename TIn>
__global__ void colsum_kernel(const TIn* __restrict__ x, int64_t n, int64_t d, int64_t s0,
                              int64_t s1, double* __restrict__ sum) {
  const int64_t col = (int64_t)blockIdx.x * kCols + threadIdx.x;
  double acc = 0.0;
  // blocks stride over the row chunks: gridDim.y is capped at 65535 (more than 16.7 M rows)
  for (int64_t r0 = (int64_t)blockIdx.y * kRowsPerBlock; r0 < n; r0 += (int64_t)gridDim.y * kRowsPerBlock) {
    const int64_t r1 = min(n, r0 + kRowsPerBlock);
    if (col < d)
      for (int64_t r = r0 + threadIdx.y; r < r1; r += kRows) acc += ld(x + r * s0 + col * s1);
  }
  __shared__ double part[kRows][kCols];
  part[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < d) {
    for (int k = 1; k < kRows; ++k) acc += part[k][threadIdx.x];
    atomicAdd(sum + col, acc);
  }
}

__global__ void finalize_mean(double* mean, int64_t d, int64_t n) {
  int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (j < d) mean[j] /= (double)n;
}

template <typename TIn, typename TOut>
__global__ void write_kernel(const TIn* __restrict__ x, int64_t n, int64_t d, int64_t s0,
                             int64_t s1, TOut* __restrict__ out, const double* __restrict__ mean) {
  const int64_t total = n * d;
  for (int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t i = idx / d, j = idx - i * d;
    out[idx] = (TOut)(ld(x + i * s0 + j * s1) - mean[j]);
  }
}

template <typename TIn, typename TOut>
std::string launch(const TIn* x, int64_t n, int64_t d, int64_t s0, int64_t s1, TOut* out,
                   double* mean, cudaStream_t st) {
  cudaError_t e = cudaMemsetAsync(mean, 0, sizeof(double) * d, st);
  if (e != cudaSuccess) return cudaGetErrorString(e);
  dim3 grid((unsigned)((d + kCols - 1) / kCols),
            (unsigned)std::min<int64_t>((n + kRowsPerBlock - 1) / kRowsPerBlock, 65535));
  colsum_kernel<TIn><<<grid, dim3(kCols, kRows), 0, st>>>(x, n, d, s0, s1, mean);
  if ((e = cudaGetLastError()) != cudaSuccess) return cudaGetErrorString(e);
  finalize_mean<<<(unsigned)((d + 255) / 256), 256, 0, st>>>(mean, d, n);
  if ((e = cudaGetLastError()) != cudaSuccess) return cudaGetErrorString(e);
  const int64_t total = n * d;
  const unsigned blocks = (unsigned)std::min<int64_t>((total + 255) / 256, 65535 * 8);
  write_kernel<TIn, TOut><<<blocks, 256, 0, st>>>(x, n, d, s0, s1, out, mean);
  e = cudaGetLastError();
  return e == cudaSuccess ? std::string() : std::string(cudaGetErrorString(e));
}

template <typename TIn>
std::string dispatch_out(const TIn* x, int64_t n, int64_t d, int64_t s0, int64_t s1, void* out,
                         DType od, double* mean, cudaStream_t st) {
  if (od == DType::kFloat32) return launch(x, n, d, s0, s1, (float*)out, mean, st);
  if (od == DType::kFloat64) return launch(x, n, d, s0, s1, (double*)out, mean, st);
  return std::string("center_columns: unsupported output dtype ") + dtype_name(od);
}

}  // namespace

std::string center_columns(const void* x, DType in_dtype, int64_t n, int64_t d, int64_t s0,
                           int64_t s1, void* out, DType out_dtype, double* mean, uintptr_t stream) {
  auto st = reinterpret_cast<cudaStream_t>(stream);
  switch (in_dtype) {
    case DType::kFloat16: return dispatch_out((const __half*)x, n, d, s0, s1, out, out_dtype, mean, st);
    case DType::kBFloat16:
      return dispatch_out((const __nv_bfloat16*)x, n, d, s0, s1, out, out_dtype, mean, st);
    case DType::kFloat32: return dispatch_out((const float*)x, n, d, s0, s1, out, out_dtype, mean, st);
    case DType::kFloat64: return dispatch_out((const double*)x, n, d, s0, s1, out, out_dtype, mean, st);
  }
  return "center_columns: unknown dtype";
}

}  // namespace hierfast::cuda
