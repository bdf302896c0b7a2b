#pragma once  // stand-in: tests/cuda_emu/cuda_emu.h emulates what conv_act.cu uses
