// linattn emulator: stands in for CUDA's <cuda_bf16.h> when cuda/*.cu files are compiled
// for the CPU. Everything lives in linattn_emu.h, which the build helper force-includes.
#pragma once
#include "linattn_emu.h"
