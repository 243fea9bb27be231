// SPDX-License-Identifier: Apache-2.0
// Test builds only (FASTLAYERS_CUDA_EMULATION): stands in for CUDA's cuda_runtime.h when the
// generic .cu files are compiled as host C++ (tests/cuda_emu/translate.py). The runtime API's
// declarations and types are CUDA's own (cuda_runtime_api.h, whose host half compiles with g++);
// the execution model (threads, blocks, barriers, shuffles, launches) is tests/cuda_emu/emu.h.
#pragma once

#include <cuda_runtime_api.h>
#include <vector_types.h>

#include "emu.h"

// The C++ overload of cuda_runtime.h that takes the kernel itself.
template <typename T>
cudaError_t cudaFuncSetAttribute(T* entry, cudaFuncAttribute attr, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(entry), attr, value);
}
