// A running top-k list, shared by the CPU and CUDA top-activating kernels
// (csrc/cpu/channel_topk.cpp, csrc/cuda/channel_topk.cu).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define HIERFAST_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define HIERFAST_HOST_DEVICE inline
#endif

namespace hierfast {

// Insert (score, index, arg) into the k-slot list (v, id, p) sorted by (score desc, index asc);
// empty slots have id -1. Ties go after existing entries, so rows fed in index order keep the
// lower index first.
HIERFAST_HOST_DEVICE void topk_insert(double* v, int64_t* id, int64_t* p, int64_t k, double score, int64_t index,
                                      int64_t arg) {
  if (id[k - 1] >= 0 && v[k - 1] >= score) return;  // fast reject: list full, not better
  int64_t j = 0;
  while (j < k && id[j] >= 0 && v[j] >= score) ++j;
  for (int64_t t = k - 1; t > j; --t) {
    v[t] = v[t - 1];
    id[t] = id[t - 1];
    p[t] = p[t - 1];
  }
  v[j] = score;
  id[j] = index;
  p[j] = arg;
}

}  // namespace hierfast
