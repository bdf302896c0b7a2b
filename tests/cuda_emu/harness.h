// What the emulation harnesses (conv_act_harness.cpp, kernels_harness.cpp) share: CHECK, which
// counts failed conditions and prints the first 20, and the exit report that
// tests/test_cuda_emulation.py reads ("failures: 0" on success).
#pragma once
#include <cstdio>

#include "cuda_emu.h"

inline int failures = 0;

#define CHECK(cond, ...)                               \
  do {                                                 \
    if (!(cond) && ++failures <= 20) {                 \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
      std::printf(__VA_ARGS__);                        \
      std::printf("\n");                               \
    }                                                  \
  } while (0)

// main's return value: 0 when every CHECK held.
inline int report() {
  std::printf("failures: %d (blocks run: %ld)\n", failures, emu::blocks_run);
  return failures == 0 ? 0 : 1;
}
