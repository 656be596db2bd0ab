// The numeric core shared by the CPU and CUDA kernels: correctly rounded float ops, 16-bit float
// conversions, FP8 E4M3 packing and 4-bit encode/decode. Every function here is __host__ __device__ so
// the CPU tests exercise the very arithmetic the kernels run.
//
// Bit-exactness between CPU and CUDA rests on two rules: every product and sum the spec rounds on its
// own goes through mul_rn/add_rn/... (on the device these are __fmul_rn & co., which nvcc never fuses
// into an FMA), and the host side is compiled with -ffp-contract=off.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "quant_format.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace qlora {

// ---- correctly rounded float32 arithmetic ---------------------------------------------------------
QLORA_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
QLORA_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
QLORA_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
QLORA_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
QLORA_HD float rcp_rn(float a) {
#if defined(__CUDA_ARCH__)
  return __frcp_rn(a);
#else
  return 1.0f / a;
#endif
}
// Round to nearest integer, ties to even (the host's default rounding mode).
QLORA_HD float rint_rn(float a) {
#if defined(__CUDA_ARCH__)
  return rintf(a);
#else
  return std::nearbyint(a);
#endif
}

QLORA_HD uint32_t f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}
QLORA_HD float bits_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

// ---- bfloat16 / float16 <-> float32 (raw 16-bit patterns, round to nearest even) ---------------------
QLORA_HD float bf16_to_f32(uint16_t b) { return bits_f32(uint32_t(b) << 16); }

QLORA_HD uint16_t f32_to_bf16_rn(float f) {
  uint32_t x = f32_bits(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t((x >> 16) | 0x0040u);  // quiet NaN
  x += 0x7FFFu + ((x >> 16) & 1u);
  return uint16_t(x >> 16);
}

QLORA_HD float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
  if (exp == 0) {  // zero or subnormal: man * 2^-24, exact in float32
    const float v = float(man) * 0x1p-24f;
    return bits_f32(f32_bits(v) | sign);
  }
  if (exp == 31) return bits_f32(sign | 0x7F800000u | (man << 13));
  return bits_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

QLORA_HD uint16_t f32_to_f16_rn(float f) {
  const uint32_t x = f32_bits(f);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7FFFFFFFu;
  if (ax > 0x7F800000u) return sign | 0x7E00u;          // NaN
  if (ax >= 0x477FF000u) return sign | 0x7C00u;         // >= 65520 rounds to infinity
  if (ax < 0x38800000u) {                               // below 2^-14: half subnormal, unit 2^-24
    const float q = rint_rn(bits_f32(ax) * 0x1p24f);    // exact scaling; q == 1024 is the smallest normal
    return sign | uint16_t(q);
  }
  const uint32_t m = ax - (112u << 23);                 // rebias the exponent from 127 to 15
  return sign | uint16_t((m + 0xFFFu + ((m >> 13) & 1u)) >> 13);
}

// ---- FP8 E4M3 ("fn": no infinities, 0x7F/0xFF are NaN, max 448), the torch.float8_e4m3fn encoding ----
// Round to nearest even; magnitudes beyond 448 saturate to 448 (torch turns [464, 480) into NaN instead,
// which double quantization never feeds it: its inputs are bounded by 448 up to one rounding).
QLORA_HD uint8_t fp8_e4m3_encode(float x) {
  const uint32_t b = f32_bits(x);
  const uint8_t sign = uint8_t((b >> 24) & 0x80u);
  const uint32_t ab = b & 0x7FFFFFFFu;
  if (ab > 0x7F800000u) return sign | 0x7Fu;
  const float a = bits_f32(ab);
  if (a >= 464.0f) return sign | 0x7Eu;
  if (a < 0x1p-6f) {                         // subnormal range, unit 2^-9; 8 carries into the first normal
    return sign | uint8_t(rint_rn(a * 512.0f));
  }
  const uint32_t man = ab & 0x7FFFFFu;
  uint32_t q = (((ab >> 23) - 120u) << 3) | (man >> 20);  // rebias 127 -> 7, keep 3 mantissa bits
  const uint32_t rest = man & 0xFFFFFu;
  if (rest > 0x80000u || (rest == 0x80000u && (q & 1u))) q += 1;
  return sign | uint8_t(q);
}

QLORA_HD float fp8_e4m3_decode(uint8_t c) {
  const uint32_t sign = uint32_t(c & 0x80u) << 24;
  const uint32_t e = (c >> 3) & 0xFu, m = c & 7u;
  if (e == 0) return bits_f32(f32_bits(float(m) * 0x1p-9f) | sign);
  if (e == 15 && m == 7) return bits_f32(sign | 0x7FC00000u);
  return bits_f32(sign | ((e + 120u) << 23) | (m << 20));
}

// ---- 4-bit code books ------------------------------------------------------------------------------
// Everything an encoder or decoder needs, derived from the 16 table values. Small enough to pass to a
// kernel by value; kernels copy it to shared memory.
struct CodeBook {
  float value[16];           // decode: code -> value in [-1, 1]
  float mid[16];             // monotonic tables: mid[i] = float32 midpoint of value[i], value[i+1]
  float mag_mid[8];          // sign-magnitude tables: midpoints between sorted magnitudes
  uint8_t rank_to_code[8];   // sign-magnitude tables: magnitude rank -> 3-bit code
  int32_t sign_magnitude;    // 1 for FP4
};

inline CodeBook make_codebook(QuantType qt) {
  CodeBook cb{};
  const float* v = code_table(qt);
  for (int i = 0; i < 16; ++i) cb.value[i] = v[i];
  cb.sign_magnitude = qt == QuantType::FP4 ? 1 : 0;
  if (cb.sign_magnitude) {
    for (int r = 0; r < 8; ++r) cb.rank_to_code[r] = kFP4RankToCode[r];
    for (int r = 0; r < 7; ++r) {
      cb.mag_mid[r] = mul_rn(add_rn(v[kFP4RankToCode[r]], v[kFP4RankToCode[r + 1]]), 0.5f);
    }
    cb.mag_mid[7] = INFINITY;
  } else {
    for (int i = 0; i < 15; ++i) cb.mid[i] = mul_rn(add_rn(v[i], v[i + 1]), 0.5f);
    if (qt == QuantType::INT4) cb.mid[14] = INFINITY;  // code 15 is unused
    cb.mid[15] = INFINITY;
  }
  return cb;
}

// Nearest code of a monotonic table: the number of midpoints strictly below s, found by a 4-step binary
// search, so s exactly on a midpoint takes the lower code.
QLORA_HD uint32_t encode_monotonic(float s, const float* mid) {
  uint32_t c = s > mid[7] ? 8u : 0u;
  c += s > mid[c + 3] ? 4u : 0u;
  c += s > mid[c + 1] ? 2u : 0u;
  c += s > mid[c] ? 1u : 0u;
  return c;
}

// Sign-magnitude tables (bitsandbytes FP4): the sign bit from s < 0, the magnitude by the same
// midpoint rule (a tie takes the smaller magnitude). Codes are the ones bitsandbytes produces.
QLORA_HD uint32_t encode_sign_magnitude(float s, const float* mag_mid, const uint8_t* rank_to_code) {
  const uint32_t sign = s < 0.0f ? 8u : 0u;
  const float a = fabsf(s);
  uint32_t r = a > mag_mid[3] ? 4u : 0u;
  r += a > mag_mid[r + 1] ? 2u : 0u;
  r += a > mag_mid[r] ? 1u : 0u;
  return sign | rank_to_code[r];
}

QLORA_HD uint32_t encode_4bit(float s, const CodeBook& cb) {
  return cb.sign_magnitude ? encode_sign_magnitude(s, cb.mag_mid, cb.rank_to_code)
                           : encode_monotonic(s, cb.mid);
}

// Blocks whose absmax is subnormal are scaled by 2^24 first (exact), so 1/absmax cannot overflow.
QLORA_HD float absmax_prescale(float absmax) { return absmax < 0x1p-126f ? 0x1p24f : 1.0f; }

// The reciprocal used to normalise a block: rounded once; 0 for an all-zero block (codes of 0.0).
QLORA_HD float block_inverse(float absmax) {
  return absmax > 0.0f ? rcp_rn(mul_rn(absmax, absmax_prescale(absmax))) : 0.0f;
}

// s = x * (1/absmax) in float32 (with the prescale of subnormal blocks folded in exactly).
QLORA_HD float normalise(float x, float prescale, float inverse) { return mul_rn(mul_rn(x, prescale), inverse); }

QLORA_HD uint8_t pack_pair(uint32_t first, uint32_t second) { return uint8_t((first << 4) | second); }

// ---- double quantization of the absmax -----------------------------------------------------------
// Decoded absmax = max(0, fp8 * scale + mean), two roundings, never negative.
QLORA_HD float decode_absmax(uint8_t code, float scale, float mean) {
  const float v = add_rn(mul_rn(fp8_e4m3_decode(code), scale), mean);
  return v > 0.0f ? v : 0.0f;
}

// The per-chunk scale: max |absmax - mean| / 448.
QLORA_HD float chunk_scale(float max_deviation) { return div_rn(max_deviation, kFp8E4M3Max); }

QLORA_HD uint8_t encode_absmax(float absmax, float scale, float mean) {
  return scale > 0.0f ? fp8_e4m3_encode(div_rn(sub_rn(absmax, mean), scale)) : uint8_t(0);
}

}  // namespace qlora
