#pragma once  // stand-in: tests/cuda_emu/cuda_emu.h emulates what csrc/cuda uses
#include <cmath>
#define CUDART_INF INFINITY
