// Host emulation of the CUDA features that csrc/cuda/conv_act.cu uses, so that its kernels'
// indexing, per-block reductions and barriers are tested on machines without a GPU
// (tests/test_cuda_emulation.py). Not a CUDA implementation: blocks run one after another; the
// threads of a block are a persistent pool of std::threads that meet at std::barriers
// (__syncthreads), __shared__ arrays are function statics (one block at a time uses them),
// atomicAdd takes a mutex, and __half / __nv_bfloat16 are float stand-ins (no rounding).
#pragma once
#include <barrier>
#include <cstdint>
#include <cstring>
#include <functional>
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
inline int emu_sms = 1, emu_blocks_per_sm = 4;  // the "device": small, so grids stride
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) { *v = emu_sms; return cudaSuccess; }
template <typename K>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, K, int, size_t) {
  *n = emu_blocks_per_sm;
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "emulated CUDA error"; }

inline std::mutex emu_atomic_mutex;
inline double atomicAdd(double* p, double v) {
  std::lock_guard<std::mutex> lock(emu_atomic_mutex);
  const double old = *p;
  *p += v;
  return old;
}

namespace emu {

// A pool of kThreads workers; run(block, body) runs body() once per thread of one block.
class Pool {
 public:
  static constexpr unsigned kThreads = 256;
  Pool() : start_(kThreads + 1), done_(kThreads + 1), sync_(kThreads) {
    for (unsigned t = 0; t < kThreads; ++t) workers_.emplace_back([this, t] { work(t); });
  }
  ~Pool() {
    quit_ = true;
    start_.arrive_and_wait();
    for (auto& w : workers_) w.join();
  }
  void run(dim3 block, const std::function<void()>& body) {
    if (block.x * block.y * block.z != kThreads) throw std::logic_error("emu::Pool runs 256-thread blocks only");
    block_ = block;
    body_ = &body;
    start_.arrive_and_wait();
    done_.arrive_and_wait();
  }
  void syncthreads() { sync_.arrive_and_wait(); }

 private:
  void work(unsigned t) {
    for (;;) {
      start_.arrive_and_wait();
      if (quit_) return;
      threadIdx = dim3(t % block_.x, (t / block_.x) % block_.y, t / (block_.x * block_.y));
      (*body_)();
      done_.arrive_and_wait();
    }
  }
  std::barrier<> start_, done_, sync_;
  std::vector<std::thread> workers_;
  dim3 block_;
  const std::function<void()>* body_ = nullptr;
  bool quit_ = false;
};

inline Pool& pool() {
  static Pool p;
  return p;
}
inline long blocks_run = 0;

// kernel<<<grid, block, 0, stream>>>(args...)  ->  emu::launch(grid, block, kernel)(args...)
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

struct __half { float v; };
struct __nv_bfloat16 { float v; };
inline float __half2float(__half h) { return h.v; }
inline __half __float2half_rn(float f) { return {f}; }
inline float __bfloat162float(__nv_bfloat16 h) { return h.v; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {f}; }
