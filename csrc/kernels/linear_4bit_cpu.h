// CPU kernel for decode-sized 4-bit GEMMs (a few rows of x, as in generation): y = x @ W^T with W's 4-bit codes
// decoded in registers and multiplied at once, so no dequantized tile of W is written and read back (the blocked
// dequantize + GEMM path of linear_4bit_cpu_ops.cpp writes and reads back 16x the weight's bytes at float32).
// Torch-free: raw pointers and row ranges; the binding splits the rows over threads.
#pragma once

#include <cstdint>

#include "numeric_core.h"

namespace qlora::cpu {

// The most rows of x the fused path takes (beyond it, dequantize + GEMM reuses each decoded weight more).
constexpr int64_t kSmallMRows = 8;

// Whether the fused path runs here: an AVX-512F/BW CPU with the AVX-512 paths on (quantize_cpu.h's switch).
bool linear_4bit_small_m_available();

// The order the fused path reads x in: x [m, k] float32 rearranged within each group of 32 elements (16 code
// bytes) to the order the kernel decodes weights in (see linear_4bit_cpu.cpp), into x_lookup [m, k].
void order_x_for_lookup(const float* x, int64_t m, int64_t k, float* x_lookup);

// y[r, n] = sum_k x[r, k] W[n, k] (+ bias[n]) for r < m <= kSmallMRows and rows n in [row_begin, row_end) of the
// [n_rows, k] quantized W (k a multiple of blocksize). x_lookup is order_x_for_lookup's. W's values are
// dequantize's in weight_format (x's dtype: table[code] * absmax rounded once to it), the products summed in
// float32. y is [m, n_rows] float32; bias may be null.
void linear_4bit_small_m_rows(const float* x_lookup, int64_t m, int64_t k, FloatFormat weight_format,
                              const uint8_t* codes, const AbsmaxSource& absmax, int blocksize, const CodeBook& cb,
                              const float* bias, float* y, int64_t n_rows, int64_t row_begin, int64_t row_end);

}  // namespace qlora::cpu
