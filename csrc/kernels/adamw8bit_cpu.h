// CPU kernel of the multi-tensor AdamW step with 8-bit states (torch-free). The bindings number the
// 256-element blocks of all tensors of a step (AdamW8bitTensor::first_block) and split the block range over
// threads; each block is dequantized, updated and requantized on its own.
#pragma once

#include <cstdint>

#include "adamw8bit_core.h"

namespace qlora::cpu {

// The signed (exp_avg) and unsigned (exp_avg_sq) maps, built once.
const DynamicMap& dynamic_map(bool is_signed);

// Updates blocks [block_begin, block_end) of tensors[0 .. ntensors) (sorted by first_block) in place: params
// and both states' codes and absmax. The arithmetic is adamw_core.h's (the 32-bit kernel's AVX2 or scalar
// path, or this kernel's AVX-512 one, same bits) on states dequantized with adamw8bit_core.h.
void adamw8bit_step_blocks(const AdamW8bitTensor* tensors, int64_t ntensors, const AdamWGroup& group,
                           int64_t block_begin, int64_t block_end);

// Blockwise 8-bit quantization of n float32 values (blocks of kAdamW8bitBlock): codes [n], absmax
// [adamw8bit_blocks(n)]. Blocks [block_begin, block_end) only.
void quantize_8bit_dynamic_blocks(const float* x, int64_t n, bool is_signed, uint8_t* codes, float* absmax,
                                  int64_t block_begin, int64_t block_end);

// The inverse: out[i] = map[codes[i]] * absmax[i / kAdamW8bitBlock], blocks [block_begin, block_end).
void dequantize_8bit_dynamic_blocks(const uint8_t* codes, const float* absmax, int64_t n, bool is_signed, float* out,
                                    int64_t block_begin, int64_t block_end);

}  // namespace qlora::cpu
