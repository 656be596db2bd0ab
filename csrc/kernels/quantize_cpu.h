// CPU kernels for 4-bit blockwise quantization and FP8 double quantization. Torch-free: raw pointers
// and block ranges; the bindings split the block range over threads (at::parallel_for).
#pragma once

#include <cstdint>

#include "numeric_core.h"

namespace qlora::cpu {

// The first-level absmax of block `block`: stored float32, or decoded from its FP8 double quantization.
inline float decoded_absmax(const AbsmaxSource& a, int64_t block) {
  if (a.f32) return a.f32[block];
  return decode_absmax(a.fp8[block], a.chunk_scale[block / kAbsmaxChunk], *a.mean);
}

// Quantizes first-level blocks [block_begin, block_end) of x (numel elements) into packed codes
// (packed_bytes(numel) bytes) and fp32 absmax ([num_blocks] floats). Returns how many of those
// elements are not finite (their blocks hold meaningless codes; the caller raises).
int64_t quantize_4bit_blocks(const void* x, FloatFormat fmt, int64_t numel, int blocksize, const CodeBook& cb,
                             uint8_t* codes, float* absmax, int64_t block_begin, int64_t block_end);

// Dequantizes blocks [block_begin, block_end) into out (numel elements of fmt).
void dequantize_4bit_blocks(const uint8_t* codes, const AbsmaxSource& absmax, int64_t numel, int blocksize,
                            const CodeBook& cb, void* out, FloatFormat fmt, int64_t block_begin, int64_t block_end);

// Dequantizes rows [row_begin, row_end) of a quantized [rows, cols] matrix (cols a multiple of blocksize,
// so rows start on block boundaries) into out, which holds (row_end - row_begin) * cols elements.
void dequantize_4bit_rows(const uint8_t* codes, const AbsmaxSource& absmax, int64_t rows, int64_t cols,
                          int blocksize, const CodeBook& cb, void* out, FloatFormat fmt, int64_t row_begin,
                          int64_t row_end);

// Double quantization, in three steps whose summation order the CUDA kernels repeat exactly:
// (1) chunk c's partial sum of absmax[c*256 .. c*256+255] in double, by a pairwise tree over 256 slots;
double absmax_chunk_sum(const float* absmax, int64_t nblocks, int64_t chunk);
// (2) the mean: partial i is added into lane i % 1024 in order of i, the lanes fold by a pairwise tree,
//     and total / nblocks is rounded once to float;
float absmax_mean(const double* chunk_sums, int64_t nchunks, int64_t nblocks);
// (3) chunk c's scale and FP8 codes.
void absmax_encode_chunk(const float* absmax, int64_t nblocks, int64_t chunk, float mean, uint8_t* codes,
                         float* chunk_scale);

void absmax_decode(const uint8_t* codes, const float* chunk_scale, float mean, int64_t nblocks, float* out);

// Whether the AVX2 paths are used (when the CPU has AVX2 and F16C). Tests switch them off to check
// that both paths give the same bits.
bool simd_enabled();
void set_simd_enabled(bool on);
// Whether dequantize and the 8-bit AdamW kernels (adamw8bit_cpu.h) also use their AVX-512 paths (AVX-512F/BW
// CPUs, and only while SIMD is on).
bool avx512_enabled();
void set_avx512_enabled(bool on);

}  // namespace qlora::cpu
