// CUDA per-channel spatial max/mean + running top-k merge. Definition and tie rules:
// csrc/cpu/channel_topk.cpp. One block per channel owns that channel's list; for each
// row b the block reduces x[b, c, :] (max with the lowest argmax, NaN counted), then
// thread 0 merges the row's score. Rows are taken in order, so dataset-index order of
// ties holds exactly as on the CPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include <string>

#include "hierfast/cuda_kernels.h"
#include "hierfast/cuda_load.cuh"
#include "hierfast/topk_list.h"

namespace hierfast::cuda {
namespace {

constexpr int kThreads = 128;

template <typename T>
__global__ void channel_topk_kernel(const T* __restrict__ x, int64_t B, int64_t S, int64_t sb, int64_t sc,
                                    int64_t ss, int64_t base, int64_t k, int mode, double* __restrict__ vals,
                                    int64_t* __restrict__ idx, int64_t* __restrict__ pos,
                                    int64_t* __restrict__ bad) {
  const int64_t c = blockIdx.x;
  double* v = vals + c * k;
  int64_t* id = idx + c * k;
  int64_t* p = pos + c * k;
  __shared__ double sv[kThreads];
  __shared__ int64_t sa[kThreads];
  __shared__ int sn[kThreads];
  for (int64_t b = 0; b < B; ++b) {
    const T* row = x + b * sb + c * sc;
    double best = mode == 0 ? -CUDART_INF : 0.0;
    int64_t arg = S;  // S = "none yet"; any real index is lower
    int nan = 0;
    for (int64_t s = threadIdx.x; s < S; s += kThreads) {
      const double a = ld(row + s * ss);
      if (a != a) {
        nan = 1;
      } else if (mode == 0) {
        if (a > best || arg == S) { best = a; arg = s; }  // s increases: first argmax per thread
      } else {
        best += a;
      }
    }
    sv[threadIdx.x] = best;
    sa[threadIdx.x] = arg;
    sn[threadIdx.x] = nan;
    __syncthreads();
    for (int w = kThreads / 2; w > 0; w >>= 1) {
      if (threadIdx.x < w) {
        const int o = threadIdx.x + w;
        sn[threadIdx.x] |= sn[o];
        if (mode == 0) {
          // Lower index wins ties; an empty slot (arg == S) never wins.
          if (sa[o] < S && (sa[threadIdx.x] == S || sv[o] > sv[threadIdx.x] ||
                            (sv[o] == sv[threadIdx.x] && sa[o] < sa[threadIdx.x]))) {
            sv[threadIdx.x] = sv[o];
            sa[threadIdx.x] = sa[o];
          }
        } else {
          sv[threadIdx.x] += sv[o];
        }
      }
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      if (sn[0]) {
        ++bad[c];
      } else {
        const double score = mode == 0 ? sv[0] : sv[0] / (double)S;
        const int64_t a = mode == 0 ? sa[0] : -1;
        topk_insert(v, id, p, k, score, base + b, a);
      }
    }
    __syncthreads();  // shared buffers are reused by the next row
  }
}

template <typename T>
std::string launch(const T* x, int64_t B, int64_t C, int64_t S, int64_t sb, int64_t sc, int64_t ss,
                   int64_t base, int64_t k, int mode, double* vals, int64_t* idx, int64_t* pos, int64_t* bad,
                   cudaStream_t st) {
  if (B == 0) return std::string();
  channel_topk_kernel<T><<<(unsigned)C, kThreads, 0, st>>>(x, B, S, sb, sc, ss, base, k, mode, vals, idx, pos,
                                                           bad);
  cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? std::string() : std::string(cudaGetErrorString(e));
}

}  // namespace

std::string channel_topk(const void* x, DType dtype, int64_t B, int64_t C, int64_t S, int64_t sb, int64_t sc,
                         int64_t ss, int64_t base, int64_t k, int mode, double* vals, int64_t* idx,
                         int64_t* pos, int64_t* bad, uintptr_t stream) {
  if (C < 1 || S < 1 || k < 1) return "channel_topk: empty input or k < 1";
  if (mode != 0 && mode != 1) return "channel_topk: mode must be 0 (max) or 1 (mean)";
  auto st = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat16:
      return launch((const __half*)x, B, C, S, sb, sc, ss, base, k, mode, vals, idx, pos, bad, st);
    case DType::kBFloat16:
      return launch((const __nv_bfloat16*)x, B, C, S, sb, sc, ss, base, k, mode, vals, idx, pos, bad, st);
    case DType::kFloat32:
      return launch((const float*)x, B, C, S, sb, sc, ss, base, k, mode, vals, idx, pos, bad, st);
    case DType::kFloat64:
      return launch((const double*)x, B, C, S, sb, sc, ss, base, k, mode, vals, idx, pos, bad, st);
  }
  return "channel_topk: unknown dtype";
}

}  // namespace hierfast::cuda
