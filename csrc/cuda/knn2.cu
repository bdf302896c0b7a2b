// CUDA screen for the fused 2-nearest-neighbour search (definition:
// hierfast/ops/knn2.py::knn2_reference; CPU version csrc/cpu/knn2.cpp; the exact
// certification runs afterwards in hierfast/ops/knn2.py::certify). One thread per query
// row; a block of kQ queries walks all references in tiles of kR points x kK features
// staged in shared memory, and each thread keeps its kKeep smallest squared distances (sum
// of squared differences in the input precision) in registers. The n x n matrix is never
// formed. References are visited in increasing index order and inserted only on strict
// improvement, so ties go to the lower index.
#include <cuda_runtime.h>

#include <string>

#include "hierfast/cuda_kernels.h"

namespace hierfast::cuda {
namespace {

constexpr int kQ = 128, kR = 32, kK = 32, kKeep = 4;

template <typename T>
__global__ void knn2_kernel(const T* __restrict__ x, int64_t n, int64_t d, int64_t s0, int64_t s1,
                            double* __restrict__ cand_d, int64_t* __restrict__ cand_j) {
  __shared__ T sq[kQ][kK + 1];
  __shared__ T sr[kR][kK + 1];
  const int t = threadIdx.x;
  const int64_t i = (int64_t)blockIdx.x * kQ + t;
  double b[kKeep];
  int64_t jb[kKeep];
#pragma unroll
  for (int k = 0; k < kKeep; ++k) { b[k] = INFINITY; jb[k] = -1; }
  for (int64_t r0 = 0; r0 < n; r0 += kR) {
    T acc[kR];
#pragma unroll
    for (int c = 0; c < kR; ++c) acc[c] = T(0);
    for (int64_t k0 = 0; k0 < d; k0 += kK) {
      // stage the block's query chunk and the reference chunk (zero-padded)
      for (int e = t; e < kQ * kK; e += kQ) {
        const int qi = e / kK, kk = e % kK;
        const int64_t gi = (int64_t)blockIdx.x * kQ + qi, gk = k0 + kk;
        sq[qi][kk] = (gi < n && gk < d) ? x[gi * s0 + gk * s1] : T(0);
      }
      for (int e = t; e < kR * kK; e += kQ) {
        const int rj = e / kK, kk = e % kK;
        const int64_t gj = r0 + rj, gk = k0 + kk;
        sr[rj][kk] = (gj < n && gk < d) ? x[gj * s0 + gk * s1] : T(0);
      }
      __syncthreads();
#pragma unroll 4
      for (int kk = 0; kk < kK; ++kk) {
        const T q = sq[t][kk];
#pragma unroll
        for (int c = 0; c < kR; ++c) {
          const T diff = q - sr[c][kk];
          acc[c] += diff * diff;
        }
      }
      __syncthreads();
    }
    if (i < n) {
#pragma unroll
      for (int c = 0; c < kR; ++c) {
        const int64_t j = r0 + c;
        if (j >= n || j == i) continue;
        const double dist = (double)acc[c];
        if (dist < b[kKeep - 1]) {  // insertion into the ascending list, unrolled (registers)
          b[kKeep - 1] = dist; jb[kKeep - 1] = j;
#pragma unroll
          for (int k = kKeep - 1; k > 0; --k) {
            if (b[k] < b[k - 1]) {
              const double tb = b[k]; b[k] = b[k - 1]; b[k - 1] = tb;
              const int64_t tj = jb[k]; jb[k] = jb[k - 1]; jb[k - 1] = tj;
            }
          }
        }
      }
    }
  }
  if (i < n) {
#pragma unroll
    for (int k = 0; k < kKeep; ++k) { cand_d[i * kKeep + k] = b[k]; cand_j[i * kKeep + k] = jb[k]; }
  }
}

}  // namespace

std::string knn2_screen(const void* x, DType dtype, int64_t n, int64_t d, int64_t s0, int64_t s1,
                        double* cand_d, int64_t* cand_j, uintptr_t stream) {
  if (n < 3) return "knn2: needs n >= 3 points";
  if (d < 1) return "knn2: needs d >= 1 features";
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const unsigned blocks = (unsigned)((n + kQ - 1) / kQ);
  if (dtype == DType::kFloat32)
    knn2_kernel<float><<<blocks, kQ, 0, st>>>((const float*)x, n, d, s0, s1, cand_d, cand_j);
  else if (dtype == DType::kFloat64)
    knn2_kernel<double><<<blocks, kQ, 0, st>>>((const double*)x, n, d, s0, s1, cand_d, cand_j);
  else
    return std::string("knn2: unsupported dtype ") + dtype_name(dtype);
  cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? std::string() : std::string(cudaGetErrorString(e));
}

}  // namespace hierfast::cuda
