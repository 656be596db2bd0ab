// Launcher of the CUDA dropout kernel (counter-based, see dropout_core.h). Torch-free: raw pointers and a
// stream; returns the first CUDA error.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "dropout_core.h"

namespace qlora::cuda {

// y[i] = x[i] * factor(seed, i) for the numel contiguous elements of `dtype` in x and y.
cudaError_t dropout(const void* x, void* y, int64_t numel, DropoutDtype dtype, const DropoutParams& d,
                    cudaStream_t stream);

}  // namespace qlora::cuda
