// CUDA conv epilogue: bias + activation in place over cuDNN's convolution output
// (or writing y and keeping z), optional per-channel statistics; backward through the
// activation fused with the bias-gradient reduction. Definition: csrc/cpu/conv_act.cpp;
// activation math: csrc/include/hierfast/act.h (shared with the CPU kernel).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>

#include "hierfast/act.h"
#include "hierfast/cuda_kernels.h"

namespace hierfast::cuda {
namespace {

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

__device__ __forceinline__ int64_t channel(int64_t idx, int64_t C, int64_t HW, bool nhwc) {
  return nhwc ? idx % C : (idx / HW) % C;
}

// Statistics: per-block shared-memory partials would need C <= smem; channel counts
// of real layers fit, but a float64 atomic per element is simpler and the tap is
// optional, so stats use warp-free atomics (correct for any C).
template <typename S>
__global__ void fwd_kernel(S* z, S* y,  // may alias (in place): no __restrict__
                           int64_t total, int64_t C, int64_t HW,
                           bool nhwc, const S* __restrict__ bias, int code, double alpha, double* stats) {
  using Cc = typename Cvt<S>::C;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t c = channel(i, C, HW, nhwc);
    Cc v = Cvt<S>::ld(z[i]);
    if (bias) v += Cvt<S>::ld(bias[c]);
    if (y != z) z[i] = Cvt<S>::st(v);
    Cc out = act::forward<Cc>(code, v, (Cc)alpha);
    y[i] = Cvt<S>::st(out);
    if (stats) {
      double o = (double)Cvt<S>::ld(Cvt<S>::st(out));
      atomicAdd(stats + 3 * c, o);
      atomicAdd(stats + 3 * c + 1, o * o);
      if (o > 0.0) atomicAdd(stats + 3 * c + 2, 1.0);
    }
  }
}

template <typename S>
__global__ void bwd_kernel(const S* __restrict__ g, const S* __restrict__ s, S* __restrict__ gz,
                           int64_t total, int64_t C, int64_t HW, bool nhwc, int code, double alpha,
                           double* gbias) {
  using Cc = typename Cvt<S>::C;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x) {
    Cc v = Cvt<S>::ld(g[i]) * act::derivative<Cc>(code, Cvt<S>::ld(s[i]), (Cc)alpha);
    gz[i] = Cvt<S>::st(v);
    if (gbias) atomicAdd(gbias + channel(i, C, HW, nhwc), (double)v);
  }
}

unsigned blocks_for(int64_t total) {
  return (unsigned)std::min<int64_t>((total + 255) / 256, 65535LL * 8);
}

std::string last_error() {
  cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? std::string() : std::string(cudaGetErrorString(e));
}

template <typename S>
std::string fwd(void* z, void* y, int64_t N, int64_t C, int64_t HW, bool nhwc, const void* bias, int code,
                double alpha, double* stats, cudaStream_t st) {
  const int64_t total = N * C * HW;
  if (total == 0) return {};
  fwd_kernel<S><<<blocks_for(total), 256, 0, st>>>((S*)z, (S*)y, total, C, HW, nhwc, (const S*)bias, code,
                                                   alpha, stats);
  return last_error();
}

template <typename S>
std::string bwd(const void* g, const void* s, void* gz, int64_t N, int64_t C, int64_t HW, bool nhwc, int code,
                double alpha, double* gbias, cudaStream_t st) {
  const int64_t total = N * C * HW;
  if (total == 0) return {};
  bwd_kernel<S><<<blocks_for(total), 256, 0, st>>>((const S*)g, (const S*)s, (S*)gz, total, C, HW, nhwc, code,
                                                   alpha, gbias);
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
