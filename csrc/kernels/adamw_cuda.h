// Launcher of the multi-tensor AdamW step on CUDA (torch-free): one launch updates every tensor of a
// parameter group, whatever their number and sizes.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "adamw_core.h"

namespace qlora::cuda {

// Elements per chunk: a block of 256 threads, 4 elements per vector access, 4 accesses per thread.
constexpr int64_t kAdamWCudaChunk = 4096;

// tensors: device array of ntensors AdamWTensor, sorted by first_chunk, whose chunks of kAdamWCudaChunk
// elements number 0 .. total_chunks-1. sm_count sizes the grid. Launches on `stream`, does not synchronize.
cudaError_t adamw_step_multi_tensor(const AdamWTensor* tensors, int ntensors, int64_t total_chunks,
                                    const AdamWGroup& group, int sm_count, cudaStream_t stream);

}  // namespace qlora::cuda
