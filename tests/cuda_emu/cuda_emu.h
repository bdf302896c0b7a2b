// Host emulation of the CUDA features that csrc/cuda/*.cu use, so that their kernels' indexing,
// per-block reductions, barriers and launch plans are tested on machines without a GPU
// (tests/test_cuda_emulation.py). Not a CUDA implementation:
// * blocks run one after another; the threads of a block are a persistent pool of std::threads
//   (at most 256) that meet at std::barriers: __syncthreads for the block, one per warp of 32
//   for __shfl_down_sync;
// * __shared__ arrays are function statics (one block at a time uses them);
// * atomicAdd takes a mutex; __half / __nv_bfloat16 are float stand-ins (no rounding);
// * the "device" is small (emu_sms x emu_blocks_per_sm resident blocks) so that grids stride.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __restrict__

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
inline thread_local dim3 threadIdx;
inline dim3 blockIdx, blockDim, gridDim;  // one block runs at a time: shared by its threads

typedef int cudaError_t;
constexpr cudaError_t cudaSuccess = 0;
typedef void* cudaStream_t;
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount };
inline int emu_sms = 1, emu_blocks_per_sm = 4;
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) { *v = emu_sms; return cudaSuccess; }
template <typename K>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, K, int, size_t) {
  *n = emu_blocks_per_sm;
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaGetDeviceCount(int* n) { *n = 1; return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "emulated CUDA error"; }
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) { std::memset(p, v, n); return cudaSuccess; }

inline std::mutex emu_atomic_mutex;
template <typename T>
T atomicAdd(T* p, T v) {
  std::lock_guard<std::mutex> lock(emu_atomic_mutex);
  const T old = *p;
  *p += v;
  return old;
}
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max(int64_t a, int64_t b) { return a < b ? b : a; }

namespace emu {

// A pool of kMax workers; run(block, body) runs body() once per thread of one block.
class Pool {
 public:
  static constexpr unsigned kMax = 256;
  Pool() : start_(kMax + 1), done_(kMax + 1) {
    for (unsigned t = 0; t < kMax; ++t) workers_.emplace_back([this, t] { work(t); });
  }
  ~Pool() {
    quit_ = true;
    start_.arrive_and_wait();
    for (auto& w : workers_) w.join();
  }
  void run(dim3 block, const std::function<void()>& body) {
    const unsigned nt = block.x * block.y * block.z;
    if (nt == 0 || nt > kMax) throw std::logic_error("emu::Pool: blocks of 1-256 threads only");
    if (nt != nt_) {  // barriers sized to the block and its warps
      nt_ = nt;
      sync_ = std::make_unique<std::barrier<>>(nt);
      warps_.clear();
      for (unsigned w = 0; w * 32 < nt; ++w) warps_.push_back(std::make_unique<std::barrier<>>(std::min(32u, nt - w * 32)));
    }
    block_ = block;
    body_ = &body;
    start_.arrive_and_wait();
    done_.arrive_and_wait();
  }
  void syncthreads() { sync_->arrive_and_wait(); }
  template <typename T>
  T shfl_down(T v, unsigned delta) {
    static_assert(sizeof(T) <= 8, "shuffles of at most 8 bytes");
    const unsigned t = linear_, w = t / 32, lane = t % 32;
    std::memcpy(&xchg_[t], &v, sizeof(T));
    warps_[w]->arrive_and_wait();
    T r = v;
    if (lane + delta < 32 && t + delta < nt_) std::memcpy(&r, &xchg_[t + delta], sizeof(T));
    warps_[w]->arrive_and_wait();
    return r;
  }

 private:
  void work(unsigned t) {
    for (;;) {
      start_.arrive_and_wait();
      if (quit_) return;
      if (t < nt_) {
        linear_ = t;
        threadIdx = dim3(t % block_.x, (t / block_.x) % block_.y, t / (block_.x * block_.y));
        (*body_)();
      }
      done_.arrive_and_wait();
    }
  }
  static inline thread_local unsigned linear_ = 0;
  std::barrier<> start_, done_;
  std::unique_ptr<std::barrier<>> sync_;
  std::vector<std::unique_ptr<std::barrier<>>> warps_;
  uint64_t xchg_[kMax] = {};
  std::vector<std::thread> workers_;
  dim3 block_;
  unsigned nt_ = 0;
  const std::function<void()>* body_ = nullptr;
  bool quit_ = false;
};

inline Pool& pool() {
  static Pool p;
  return p;
}
inline long blocks_run = 0;

// kernel<<<grid, block, smem, stream>>>(args...)  ->  emu::launch(grid, block, kernel)(args...)
template <typename K>
auto launch(dim3 grid, dim3 block, K kernel) {
  return [=](auto... args) {
    blockDim = block;
    gridDim = grid;
    const std::function<void()> body = [&] { kernel(args...); };
    for (unsigned bz = 0; bz < grid.z; ++bz)
      for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          blockIdx = dim3(bx, by, bz);
          pool().run(block, body);
          ++blocks_run;
        }
  };
}

}  // namespace emu

inline void __syncthreads() { emu::pool().syncthreads(); }
template <typename T>
T __shfl_down_sync(unsigned, T v, unsigned delta) { return emu::pool().shfl_down(v, delta); }

struct __half { float v; };
struct __nv_bfloat16 { float v; };
inline float __half2float(__half h) { return h.v; }
inline __half __float2half_rn(float f) { return {f}; }
inline float __bfloat162float(__nv_bfloat16 h) { return h.v; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {f}; }
