// Launchers of the 8-bit-state AdamW step and of the blockwise dynamic-map (de)quantization on CUDA
// (torch-free): one launch updates every tensor of a parameter group, whatever their number and sizes.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "adamw8bit_core.h"

namespace qlora::cuda {

// tensors: device array of ntensors AdamW8bitTensor, sorted by first_block, whose blocks of kAdamW8bitBlock
// elements number 0 .. total_blocks-1. sm_count sizes the grid. Launches on `stream`, does not synchronize.
cudaError_t adamw8bit_step_multi_tensor(const AdamW8bitTensor* tensors, int ntensors, int64_t total_blocks,
                                        const AdamWGroup& group, int sm_count, cudaStream_t stream);

// x: n float32 (device) -> codes [n] uint8, absmax [adamw8bit_blocks(n)] float32.
cudaError_t quantize_8bit_dynamic(const float* x, int64_t n, bool is_signed, uint8_t* codes, float* absmax,
                                  int sm_count, cudaStream_t stream);

// codes [n], absmax [adamw8bit_blocks(n)] -> out [n] float32.
cudaError_t dequantize_8bit_dynamic(const uint8_t* codes, const float* absmax, int64_t n, bool is_signed, float* out,
                                    int sm_count, cudaStream_t stream);

}  // namespace qlora::cuda
