// The 8-bit-state AdamW format and its numeric core, shared by the CPU and CUDA kernels (torch-free, every
// function __host__ __device__, every operation rounded on its own as in numeric_core.h, so both devices give
// the same bits). One place defines the two 256-entry "dynamic" code maps, the block size and the encoding.
//
// Format: a state tensor (exp_avg or exp_avg_sq) of n elements is cut into blocks of kAdamW8bitBlock
// consecutive elements (in the parameter's memory order; the last block may be partial). Each block stores
// its float32 absmax and one uint8 code per element: element = map[code] * absmax, with the signed map for
// exp_avg and the unsigned map for exp_avg_sq.
//
// The maps are the "dynamic tree" maps of Dettmers et al., 8-bit Optimizers via Block-wise Quantization
// (bitsandbytes' create_dynamic_map(signed=True/False) with 7 exponent levels): level i = 0..6 covers
// [0.1, 1] * 10^(i-6) cut into 2^i (signed) or 2^(i+1) (unsigned) equal intervals and takes their midpoints;
// with 0 and 1.0 that makes 256 values. The signed map has each positive value negated too (so its smallest
// value is -0.99297, not -1); codes are sorted by value. A value is the integer ratio
//   (2^(i+1+u) + 18 j + 9) / (2^(i+1+u) * 10^(7-i))     (u = 1 for the unsigned map, j = 0 .. 2^(i+u)-1)
// which we divide in double and round to float32 (bitsandbytes builds them in float32 arithmetic instead, so
// a few of its values differ from ours in the last bit).
#pragma once

#include <cstdint>

#include "adamw_core.h"

namespace qlora {

// Elements per quantization block (one float32 absmax each).
constexpr int kAdamW8bitBlock = 256;
constexpr int kDynamicMapSize = 256;
// The codes of 0.0: the signed map's middle code, the unsigned map's first.
constexpr int kDynamicSignedZeroCode = 127;
constexpr int kDynamicUnsignedZeroCode = 0;

QLORA_HD int64_t adamw8bit_blocks(int64_t numel) { return (numel + kAdamW8bitBlock - 1) / kAdamW8bitBlock; }

// floor(log2(x)) for 1 <= x < 2^31.
QLORA_HD int floor_log2(uint32_t x) {
  int r = 0;
  while (x >>= 1) ++r;
  return r;
}

// The positive value j of level i (see above), rounded once from double to float32.
QLORA_HD float dynamic_level_value(int i, int j, bool is_signed) {
  const int64_t den2 = int64_t(1) << (i + (is_signed ? 1 : 2));
  int64_t pow10 = 1;
  for (int k = 0; k < 7 - i; ++k) pow10 *= 10;
  const double num = double(den2 + 18 * int64_t(j) + 9);  // exact: < 2^53
  const double den = double(den2 * pow10);
#if defined(__CUDA_ARCH__)
  return __double2float_rn(__ddiv_rn(num, den));
#else
  return static_cast<float>(num / den);  // IEEE division, then round to nearest even
#endif
}

// map[code] of the signed (exp_avg) or unsigned (exp_avg_sq) dynamic map, code in [0, 256).
QLORA_HD float dynamic_map_value(int code, bool is_signed) {
  if (code == kDynamicMapSize - 1) return 1.0f;
  if (is_signed) {
    if (code == kDynamicSignedZeroCode) return 0.0f;
    // codes 128..254 are the positive values in order, codes 126..0 the same values negated
    const bool negative = code < kDynamicSignedZeroCode;
    const int k = negative ? kDynamicSignedZeroCode - 1 - code : code - kDynamicSignedZeroCode - 1;  // 0..126
    const int i = floor_log2(uint32_t(k + 1));  // level i holds 2^i values, the first at k = 2^i - 1
    const float v = dynamic_level_value(i, k + 1 - (1 << i), true);
    return negative ? -v : v;
  }
  if (code == kDynamicUnsignedZeroCode) return 0.0f;
  const int k = code - 1;                        // 0..253
  const int i = floor_log2(uint32_t(k + 2)) - 1;  // level i holds 2^(i+1) values, the first at k = 2^(i+1) - 2
  return dynamic_level_value(i, k + 2 - (2 << i), false);
}

// A map as the kernels use it: its values by code, and the float32 midpoints between neighbouring values
// (mid[c] = (value[c] + value[c+1]) * 0.5, mid[255] = +inf) for encoding.
struct DynamicMap {
  float value[kDynamicMapSize];
  float mid[kDynamicMapSize];
};

// Entry c of a map (c in [0, 256)): value and midpoint, for kernels that fill a map one code per thread.
QLORA_HD void dynamic_map_entry(int c, bool is_signed, float* value, float* mid) {
  value[c] = dynamic_map_value(c, is_signed);
  mid[c] = c + 1 < kDynamicMapSize
               ? mul_rn(add_rn(dynamic_map_value(c, is_signed), dynamic_map_value(c + 1, is_signed)), 0.5f)
               : INFINITY;
}

inline DynamicMap make_dynamic_map(bool is_signed) {
  DynamicMap m{};
  for (int c = 0; c < kDynamicMapSize; ++c) dynamic_map_entry(c, is_signed, m.value, m.mid);
  return m;
}

// Nearest code of a normalised value s: the number of midpoints strictly below s, by an 8-step binary search
// (a value exactly on a midpoint takes the lower code; NaN gives code 0).
QLORA_HD uint8_t dynamic_encode(float s, const float* mid) {
  uint32_t c = s > mid[127] ? 128u : 0u;
  c += s > mid[c + 63] ? 64u : 0u;
  c += s > mid[c + 31] ? 32u : 0u;
  c += s > mid[c + 15] ? 16u : 0u;
  c += s > mid[c + 7] ? 8u : 0u;
  c += s > mid[c + 3] ? 4u : 0u;
  c += s > mid[c + 1] ? 2u : 0u;
  c += s > mid[c] ? 1u : 0u;
  return uint8_t(c);
}

// A running block absmax: |x| replaces acc only when larger, so NaN never enters it and the result does not
// depend on the order of the fold (the CPU folds in order, CUDA as a warp tree).
QLORA_HD float absmax_fold(float acc, float x) {
  const float a = fabsf(x);
  return a > acc ? a : acc;
}

// Dequantized element: map value times the block's absmax, rounded once.
QLORA_HD float dynamic_decode(uint8_t code, const float* value, float absmax) { return mul_rn(value[code], absmax); }

// Code of x in a block of absmax `absmax` whose normalising constants are prescale = absmax_prescale(absmax)
// and inverse = block_inverse(absmax) (numeric_core.h: s = x * prescale * (1/(absmax * prescale)), an
// all-zero block encodes 0.0).
QLORA_HD uint8_t dynamic_quantize(float x, const float* mid, float prescale, float inverse) {
  return dynamic_encode(normalise(x, prescale, inverse), mid);
}

// One tensor of a multi-tensor 8-bit step: the parameter and gradient (`format`, dense, one layout), the
// codes of both states in that layout (uint8, one per element) and their absmax (float32, one per block of
// kAdamW8bitBlock elements in memory order), and the step sizes of its own step count.
struct AdamW8bitTensor {
  void* param = nullptr;
  const void* grad = nullptr;
  uint8_t* exp_avg_codes = nullptr;
  float* exp_avg_absmax = nullptr;
  uint8_t* exp_avg_sq_codes = nullptr;
  float* exp_avg_sq_absmax = nullptr;
  int64_t numel = 0;
  int64_t first_block = 0;             // index of this tensor's first block in the launch (prefix sum)
  float neg_step_size = 0.0f;          // -lr / (1 - beta1^t)
  float bias_correction2_sqrt = 1.0f;  // sqrt(1 - beta2^t)
  FloatFormat format = FloatFormat::F32;
  int32_t vector_aligned = 0;          // CUDA: 8-element vector accesses allowed for all six arrays
};

}  // namespace qlora
