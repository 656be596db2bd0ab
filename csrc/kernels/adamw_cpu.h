// CPU kernel of the multi-tensor AdamW step (torch-free). The bindings cut all tensors of a step into
// chunks of kAdamWCpuChunk elements (AdamWTensor::first_chunk numbers them) and split the chunk range
// over threads.
#pragma once

#include <cstdint>

#include "adamw_core.h"

namespace qlora::cpu {

constexpr int64_t kAdamWCpuChunk = 16384;

// Updates chunks [chunk_begin, chunk_end) of tensors[0 .. ntensors) (sorted by first_chunk) in place.
// Uses the AVX2 path when simd_enabled() (quantize_cpu.h); both paths give the same bits.
void adamw_step_chunks(const AdamWTensor* tensors, int64_t ntensors, const AdamWGroup& group, int64_t chunk_begin,
                       int64_t chunk_end);

// Updates elements [begin, end) of one tensor in place (the same paths and bits as adamw_step_chunks; the
// 8-bit-state kernel runs it on a block's dequantized states).
void adamw_step_range(const AdamWTensor& tensor, const AdamWGroup& group, int64_t begin, int64_t end);

}  // namespace qlora::cpu
