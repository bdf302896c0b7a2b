// CUDA conv epilogue: bias + activation in place over cuDNN's convolution output
// (or writing y and keeping z), optional per-channel statistics; backward through the
// activation fused with the bias-gradient reduction. Definition: csrc/cpu/conv_act.cpp;
// activation math: csrc/include/hierfast/act.h (shared with the CPU kernel).
//
// Launch: each thread owns one channel, so the bias is loaded once and no element needs
// an integer division by C to find its channel; the per-channel sums (statistics, bias
// gradient) are reduced within the block in shared memory and added to the float64
// totals with one atomic per block and channel, not one per element (thousands of
// same-address atomics serialise in L2). As csrc/cuda/center.cu does for column sums.
// * NHWC (channels_last): a block is TC channel lanes (a power of two <= 32, >= C when C
//   is small) x 256/TC pixel lanes; a warp reads consecutive channels of its pixels.
// * NCHW: a block is 256 lanes over one channel's N*HW positions (grid.x = channel).
// Each thread strides over its rows (pixels) with 4 loads in flight before it stores.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "hierfast/act.h"
#include "hierfast/cuda_kernels.h"

namespace hierfast::cuda {
namespace {

constexpr int kThreads = 256;  // per block, a power of two (the tree reduction needs it)
constexpr int kUnroll = 4;     // rows per thread in flight: memory-level parallelism

template <typename S> struct Cvt;
template <> struct Cvt<float> {
  using C = float;
  static __device__ __forceinline__ C ld(float v) { return v; }
  static __device__ __forceinline__ float st(C v) { return v; }
};
template <> struct Cvt<double> {
  using C = double;
  static __device__ __forceinline__ C ld(double v) { return v; }
  static __device__ __forceinline__ double st(C v) { return v; }
};
template <> struct Cvt<__half> {
  using C = float;
  static __device__ __forceinline__ C ld(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half st(C v) { return __float2half_rn(v); }
};
template <> struct Cvt<__nv_bfloat16> {
  using C = float;
  static __device__ __forceinline__ C ld(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 st(C v) { return __float2bfloat16_rn(v); }
};

// The element of row r (a pixel n*HW + hw) in channel c. I: uint32_t when every index
// fits (a 32-bit division for NCHW), else int64_t.
template <typename I>
__device__ __forceinline__ I element(I r, I c, I C, I HW, bool nhwc) {
  if (nhwc) return r * C + c;
  const I n = r / HW;
  return (n * C + c) * HW + (r - n * HW);
}

// The thread's channel: NHWC blockIdx.x is a tile of blockDim.x channels, NCHW one channel.
template <typename I>
__device__ __forceinline__ I my_channel(bool nhwc) {
  return nhwc ? (I)blockIdx.x * blockDim.x + threadIdx.x : (I)blockIdx.x;
}

// Sum of v over threadIdx.y for each threadIdx.x (blockDim.y a power of two); every thread
// of the block must call it. The result is valid in every thread.
__device__ double sum_over_rows(double v, double* sh) {
  const unsigned tx = threadIdx.x, ty = threadIdx.y, tc = blockDim.x;
  sh[ty * tc + tx] = v;
  __syncthreads();
  for (unsigned s = blockDim.y / 2; s > 0; s >>= 1) {
    if (ty < s) sh[ty * tc + tx] += sh[(ty + s) * tc + tx];
    __syncthreads();
  }
  const double total = sh[tx];
  __syncthreads();  // sh is reused by the next call
  return total;
}

// Statistics: [sum, sum of squares, count > 0] of the rounded output, per channel.
template <typename S, typename I>
__global__ void __launch_bounds__(kThreads)
fwd_kernel(S* z, S* y,  // may alias (in place): no __restrict__
           I C, I HW, I rows, bool nhwc, const S* __restrict__ bias, int code, double alpha,
           double* stats) {
  using Cc = typename Cvt<S>::C;
  __shared__ double sh[kThreads];
  const I c = my_channel<I>(nhwc);
  const bool live = c < C;
  const Cc b = (bias != nullptr && live) ? Cvt<S>::ld(bias[c]) : Cc(0);
  const Cc a = (Cc)alpha;
  const I step = (I)gridDim.y * blockDim.y;
  double s1 = 0.0, s2 = 0.0, s3 = 0.0;
  if (live) {
    for (I r = (I)blockIdx.y * blockDim.y + threadIdx.y; r < rows; r += kUnroll * step) {
      I at[kUnroll];
      Cc v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {  // all loads first: y may alias z
        const I ru = r + (I)u * step;
        at[u] = ru < rows ? element<I>(ru, c, C, HW, nhwc) : (I)0;
        v[u] = ru < rows ? Cvt<S>::ld(z[at[u]]) : Cc(0);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (r + (I)u * step >= rows) break;
        Cc pre = v[u];
        if (bias != nullptr) pre += b;
        if (y != z && bias != nullptr) z[at[u]] = Cvt<S>::st(pre);  // z keeps the pre-activation
        const S out = Cvt<S>::st(act::forward<Cc>(code, pre, a));
        y[at[u]] = out;
        if (stats != nullptr) {
          const double o = (double)Cvt<S>::ld(out);
          s1 += o;
          s2 += o * o;
          s3 += o > 0.0 ? 1.0 : 0.0;
        }
      }
    }
  }
  if (stats != nullptr) {  // the same for every thread: all reach the barriers
    s1 = sum_over_rows(s1, sh);
    s2 = sum_over_rows(s2, sh);
    s3 = sum_over_rows(s3, sh);
    if (live && threadIdx.y == 0) {
      atomicAdd(stats + 3 * c, s1);
      atomicAdd(stats + 3 * c + 1, s2);
      atomicAdd(stats + 3 * c + 2, s3);
    }
  }
}

// grad_z = grad_y * act'(saved); grad_bias[c] += the unrounded sum of grad_z over channel c.
template <typename S, typename I>
__global__ void __launch_bounds__(kThreads)
bwd_kernel(const S* __restrict__ g, const S* __restrict__ s, S* __restrict__ gz, I C, I HW, I rows,
           bool nhwc, int code, double alpha, double* gbias) {
  using Cc = typename Cvt<S>::C;
  __shared__ double sh[kThreads];
  const I c = my_channel<I>(nhwc);
  const bool live = c < C;
  const Cc a = (Cc)alpha;
  const I step = (I)gridDim.y * blockDim.y;
  double acc = 0.0;
  if (live) {
    for (I r = (I)blockIdx.y * blockDim.y + threadIdx.y; r < rows; r += kUnroll * step) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {  // restrict: the compiler may issue the loads early
        const I ru = r + (I)u * step;
        if (ru >= rows) break;
        const I i = element<I>(ru, c, C, HW, nhwc);
        const Cc v = Cvt<S>::ld(g[i]) * act::derivative<Cc>(code, Cvt<S>::ld(s[i]), a);
        gz[i] = Cvt<S>::st(v);
        acc += (double)v;
      }
    }
  }
  if (gbias != nullptr) {
    acc = sum_over_rows(acc, sh);
    if (live && threadIdx.y == 0) atomicAdd(gbias + c, acc);
  }
}

std::string last_error() {
  cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? std::string() : std::string(cudaGetErrorString(e));
}

// Blocks of `kernel` that the current device holds at once (its SMs x the blocks per SM that
// the kernel's registers allow: 6-8 of 256 threads); each thread then strides over its rows,
// so one wave covers the tensor without a partial last wave. Cached per kernel and device.
template <auto Kernel>
int64_t one_wave() {
  constexpr int kDevices = 64;
  static int cached[kDevices] = {};  // 0: not asked yet (a benign race: every writer stores the same value)
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kDevices) {
    cudaGetLastError();  // clear it: the launch reports its own errors
    return 1024;
  }
  if (cached[dev] == 0) {
    int sms = 0, per_sm = 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, Kernel, kThreads, 0) != cudaSuccess) {
      cudaGetLastError();
      return 1024;
    }
    cached[dev] = std::max(1, sms * std::max(1, per_sm));
  }
  return cached[dev];
}

struct Plan {
  dim3 grid, block;
};

// NHWC: TC channel lanes (the power of two >= C, at most 32) x 256/TC pixel lanes, blockIdx.x a
// tile of TC channels; NCHW: 256 lanes over one channel (blockIdx.x). blockIdx.y splits the rows
// (N*HW pixels) so that the grid is about one wave.
Plan plan(int64_t N, int64_t C, int64_t HW, bool nhwc, int64_t wave) {
  unsigned tc = 1;
  if (nhwc)
    while (tc < 32 && (int64_t)tc < C) tc *= 2;
  const unsigned tp = kThreads / tc;
  const int64_t rows = N * HW, gx = nhwc ? (C + tc - 1) / tc : C;
  const int64_t gy = std::min<int64_t>({(rows + tp - 1) / tp, std::max<int64_t>(1, wave / gx), 65535});
  return {dim3((unsigned)gx, (unsigned)gy), dim3(tc, tp)};
}

// f(I{}) with I the index type for N x C x HW elements: uint32_t below 2^31 (a 32-bit division
// for NCHW), else int64_t.
template <typename F>
void with_index_type(int64_t N, int64_t C, int64_t HW, F&& f) {
  if (N * C * HW <= (int64_t)INT32_MAX)
    f(uint32_t{});
  else
    f(int64_t{});
}

template <typename S>
std::string fwd(void* z, void* y, int64_t N, int64_t C, int64_t HW, bool nhwc, const void* bias, int code,
                double alpha, double* stats, cudaStream_t st) {
  if (N * C * HW == 0) return {};
  with_index_type(N, C, HW, [&](auto index) {
    using I = decltype(index);
    const Plan p = plan(N, C, HW, nhwc, one_wave<fwd_kernel<S, I>>());
    fwd_kernel<S, I><<<p.grid, p.block, 0, st>>>((S*)z, (S*)y, (I)C, (I)HW, (I)(N * HW), nhwc, (const S*)bias, code,
                                                 alpha, stats);
  });
  return last_error();
}

template <typename S>
std::string bwd(const void* g, const void* s, void* gz, int64_t N, int64_t C, int64_t HW, bool nhwc, int code,
                double alpha, double* gbias, cudaStream_t st) {
  if (N * C * HW == 0) return {};
  with_index_type(N, C, HW, [&](auto index) {
    using I = decltype(index);
    const Plan p = plan(N, C, HW, nhwc, one_wave<bwd_kernel<S, I>>());
    bwd_kernel<S, I><<<p.grid, p.block, 0, st>>>((const S*)g, (const S*)s, (S*)gz, (I)C, (I)HW, (I)(N * HW), nhwc,
                                                 code, alpha, gbias);
  });
  return last_error();
}

}  // namespace

std::string conv_act_forward(void* z, void* y, DType dtype, int64_t N, int64_t C, int64_t HW, bool nhwc,
                             const void* bias, int act_code, double alpha, double* stats, uintptr_t stream) {
  auto st = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat16: return fwd<__half>(z, y, N, C, HW, nhwc, bias, act_code, alpha, stats, st);
    case DType::kBFloat16: return fwd<__nv_bfloat16>(z, y, N, C, HW, nhwc, bias, act_code, alpha, stats, st);
    case DType::kFloat32: return fwd<float>(z, y, N, C, HW, nhwc, bias, act_code, alpha, stats, st);
    case DType::kFloat64: return fwd<double>(z, y, N, C, HW, nhwc, bias, act_code, alpha, stats, st);
  }
  return "conv_act_forward: unknown dtype";
}

std::string conv_act_backward(const void* grad_y, const void* saved, void* grad_z, DType dtype, int64_t N,
                              int64_t C, int64_t HW, bool nhwc, int act_code, double alpha, double* grad_bias,
                              uintptr_t stream) {
  auto st = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat16: return bwd<__half>(grad_y, saved, grad_z, N, C, HW, nhwc, act_code, alpha, grad_bias, st);
    case DType::kBFloat16:
      return bwd<__nv_bfloat16>(grad_y, saved, grad_z, N, C, HW, nhwc, act_code, alpha, grad_bias, st);
    case DType::kFloat32: return bwd<float>(grad_y, saved, grad_z, N, C, HW, nhwc, act_code, alpha, grad_bias, st);
    case DType::kFloat64: return bwd<double>(grad_y, saved, grad_z, N, C, HW, nhwc, act_code, alpha, grad_bias, st);
  }
  return "conv_act_backward: unknown dtype";
}

}  // namespace hierfast::cuda
