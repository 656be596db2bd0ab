// CPU kernels for 4-bit blockwise quantization (scalar reference path + AVX2 path with the same bits)
// and for the FP8 double quantization of the absmax. See quantize_cpu.h for the contract.
#include "quantize_cpu.h"

#include <algorithm>
#include <atomic>
#include <cmath>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define QLORA_X86 1
#endif

namespace qlora::cpu {
namespace {

inline float load_as_f32(const void* x, FloatFormat fmt, int64_t i) {
  switch (fmt) {
    case FloatFormat::F16: return f16_to_f32(static_cast<const uint16_t*>(x)[i]);
    case FloatFormat::BF16: return bf16_to_f32(static_cast<const uint16_t*>(x)[i]);
    default: return static_cast<const float*>(x)[i];
  }
}

inline int64_t element_bytes(FloatFormat fmt) { return fmt == FloatFormat::F32 ? 4 : 2; }

inline void store_from_f32(void* out, FloatFormat fmt, int64_t i, float v) {
  switch (fmt) {
    case FloatFormat::F16: static_cast<uint16_t*>(out)[i] = f32_to_f16_rn(v); break;
    case FloatFormat::BF16: static_cast<uint16_t*>(out)[i] = f32_to_bf16_rn(v); break;
    default: static_cast<float*>(out)[i] = v;
  }
}

// ---- scalar paths: the reference the SIMD paths must match bit for bit -------------------------------
int64_t quantize_block_scalar(const void* x, FloatFormat fmt, int64_t start, int64_t n, const CodeBook& cb,
                              uint8_t* codes, float* absmax_out) {
  float buf[kMaxBlocksize];
  float amax = 0.0f;
  int64_t nonfinite = 0;
  for (int64_t i = 0; i < n; ++i) {
    buf[i] = load_as_f32(x, fmt, start + i);
    const float a = std::fabs(buf[i]);
    nonfinite += !(a <= 3.4028234663852886e38f);
    amax = a > amax ? a : amax;
  }
  *absmax_out = amax;
  const float pre = absmax_prescale(amax), inv = block_inverse(amax);
  for (int64_t i = 0; i < n; i += 2) {
    const uint32_t c0 = encode_4bit(normalise(buf[i], pre, inv), cb);
    const uint32_t c1 = i + 1 < n ? encode_4bit(normalise(buf[i + 1], pre, inv), cb) : 0u;
    codes[(start + i) / 2] = pack_pair(c0, c1);
  }
  return nonfinite;
}

// Decodes elements [start, start + n) into dst[0 .. n).
void dequantize_block_scalar(const uint8_t* codes, float amax, int64_t start, int64_t n, const CodeBook& cb,
                             void* dst, FloatFormat fmt) {
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t byte = codes[(start + i) / 2];
    const uint32_t code = ((start + i) & 1) ? (byte & 0xFu) : (byte >> 4);
    store_from_f32(dst, fmt, i, mul_rn(cb.value[code], amax));
  }
}

#if QLORA_X86
// ---- AVX2 paths (full blocks only; blocksize is a multiple of 8) ------------------------------------
__attribute__((target("avx2,f16c"))) inline __m256 load8_f32(const void* x, FloatFormat fmt, int64_t i) {
  switch (fmt) {
    case FloatFormat::F16:
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + i)));
    case FloatFormat::BF16: {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + i));
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    default: return _mm256_loadu_ps(static_cast<const float*>(x) + i);
  }
}

// Codes of 8 normalised values, one per int32 lane.
__attribute__((target("avx2,f16c"))) inline __m256i encode8(__m256 s, const CodeBook& cb) {
  __m256i c = _mm256_setzero_si256();
  if (!cb.sign_magnitude) {
    for (int k = 0; k < 15; ++k) {  // count midpoints strictly below s (compare result is -1 per lane)
      c = _mm256_sub_epi32(c, _mm256_castps_si256(_mm256_cmp_ps(s, _mm256_set1_ps(cb.mid[k]), _CMP_GT_OQ)));
    }
    return c;
  }
  const __m256 a = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), s);
  for (int k = 0; k < 7; ++k) {
    c = _mm256_sub_epi32(c, _mm256_castps_si256(_mm256_cmp_ps(a, _mm256_set1_ps(cb.mag_mid[k]), _CMP_GT_OQ)));
  }
  const __m256i rank_to_code = _mm256_setr_epi32(cb.rank_to_code[0], cb.rank_to_code[1], cb.rank_to_code[2],
                                                 cb.rank_to_code[3], cb.rank_to_code[4], cb.rank_to_code[5],
                                                 cb.rank_to_code[6], cb.rank_to_code[7]);
  const __m256i code = _mm256_permutevar8x32_epi32(rank_to_code, c);
  const __m256i sign = _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(s, _mm256_setzero_ps(), _CMP_LT_OQ)),
                                        _mm256_set1_epi32(8));
  return _mm256_or_si256(code, sign);
}

__attribute__((target("avx2,f16c"))) int64_t quantize_block_avx2(const void* x, FloatFormat fmt, int64_t start,
                                                                  int n, const CodeBook& cb, uint8_t* codes,
                                                                  float* absmax_out) {
  alignas(32) float buf[kMaxBlocksize];
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256 flt_max = _mm256_set1_ps(3.4028234663852886e38f);
  __m256 vmax = _mm256_setzero_ps();
  int64_t nonfinite = 0;
  for (int i = 0; i < n; i += 8) {
    const __m256 v = load8_f32(x, fmt, start + i);
    _mm256_store_ps(buf + i, v);
    const __m256 a = _mm256_and_ps(v, abs_mask);
    nonfinite += 8 - __builtin_popcount(_mm256_movemask_ps(_mm256_cmp_ps(a, flt_max, _CMP_LE_OQ)));
    vmax = _mm256_max_ps(vmax, a);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  float amax = 0.0f;
  for (float l : lanes) amax = l > amax ? l : amax;
  *absmax_out = amax;
  const __m256 pre = _mm256_set1_ps(absmax_prescale(amax)), inv = _mm256_set1_ps(block_inverse(amax));
  for (int i = 0; i < n; i += 8) {
    const __m256 s = _mm256_mul_ps(_mm256_mul_ps(_mm256_load_ps(buf + i), pre), inv);
    const __m256i c = encode8(s, cb);
    // Each 64-bit lane holds (even code, odd code); fold to (even << 4 | odd) in its low byte.
    const __m256i pair = _mm256_or_si256(_mm256_slli_epi64(c, 4), _mm256_srli_epi64(c, 32));
    alignas(32) uint64_t p[4];
    _mm256_store_si256(reinterpret_cast<__m256i*>(p), pair);
    uint8_t* dst = codes + (start + i) / 2;
    for (int k = 0; k < 4; ++k) dst[k] = uint8_t(p[k]);
  }
  return nonfinite;
}

__attribute__((target("avx2,f16c"))) void dequantize_block_avx2(const uint8_t* codes, float amax, int64_t start, int n,
                                                                const CodeBook& cb, void* dst, FloatFormat fmt) {
  const __m256 table_lo = _mm256_loadu_ps(cb.value), table_hi = _mm256_loadu_ps(cb.value + 8);
  const __m256 scale = _mm256_set1_ps(amax);
  // Byte k of a 32-bit word holds elements 2k (high nibble) and 2k+1 (low nibble).
  const __m256i shifts = _mm256_setr_epi32(4, 0, 12, 8, 20, 16, 28, 24);
  const __m256i nibble = _mm256_set1_epi32(0xF);
  for (int i = 0; i < n; i += 8) {
    uint32_t word;
    std::memcpy(&word, codes + (start + i) / 2, 4);
    const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(int(word)), shifts), nibble);
    const __m256 lo = _mm256_permutevar8x32_ps(table_lo, idx), hi = _mm256_permutevar8x32_ps(table_hi, idx);
    const __m256 value = _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
    const __m256 v = _mm256_mul_ps(value, scale);
    const int64_t e = i;
    if (fmt == FloatFormat::F32) {
      _mm256_storeu_ps(static_cast<float*>(dst) + e, v);
    } else if (fmt == FloatFormat::F16) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(dst) + e),
                       _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else {  // bf16 as f32_to_bf16_rn (a NaN absmax, from a corrupted state, stays NaN)
      const __m256i bits = _mm256_castps_si256(v);
      const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
      const __m256i rounded =
          _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
      const __m256i quiet_nan = _mm256_or_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x40));
      const __m256i r = _mm256_blendv_epi8(rounded, quiet_nan, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
      const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(dst) + e), _mm256_castsi256_si128(packed));
    }
  }
}

// AVX-512 dequantize: one 16-entry vpermps decodes 16 codes, so a block takes a quarter of the AVX2 steps.
// (The all-ones-mask forms of the intrinsics compute the same thing as the plain ones, which GCC 12 flags
// with false -Wmaybe-uninitialized warnings.)
__attribute__((target("avx512f,avx512bw"))) void dequantize_block_avx512(const uint8_t* codes, float amax,
                                                                        int64_t start, int n, const CodeBook& cb,
                                                                        void* dst, FloatFormat fmt) {
  const __m512 table = _mm512_loadu_ps(cb.value);
  const __m512 scale = _mm512_set1_ps(amax);
  const __m128i low_nibbles = _mm_set1_epi8(0x0F);
  constexpr __mmask16 kAll = 0xFFFF;
  for (int i = 0; i < n; i += 16) {
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + (start + i) / 2));
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low_nibbles);
    const __m128i lo = _mm_and_si128(bytes, low_nibbles);
    const __m512i idx = _mm512_maskz_cvtepu8_epi32(kAll, _mm_unpacklo_epi8(hi, lo));  // element order: hi0, lo0, hi1, ...
    const __m512 v = _mm512_mul_ps(_mm512_maskz_permutexvar_ps(kAll, idx, table), scale);
    if (fmt == FloatFormat::F32) {
      _mm512_storeu_ps(static_cast<float*>(dst) + i, v);
    } else if (fmt == FloatFormat::F16) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(dst) + i),
                          _mm512_maskz_cvtps_ph(kAll, v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else {  // bf16 by integer rounding (vcvtneps2bf16 would flush subnormals to zero); NaN stays NaN
      const __m512i bits = _mm512_castps_si512(v);
      const __m512i top = _mm512_maskz_srli_epi32(kAll, bits, 16);
      const __m512i lsb = _mm512_and_si512(top, _mm512_set1_epi32(1));
      const __m512i rounded = _mm512_maskz_srli_epi32(
          kAll, _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
      const __mmask16 is_nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      const __m512i r = _mm512_mask_or_epi32(rounded, is_nan, top, _mm512_set1_epi32(0x40));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(dst) + i), _mm512_maskz_cvtepi32_epi16(kAll, r));
    }
  }
}

bool cpu_has_avx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c"); }
bool cpu_has_avx512() { return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"); }
#else
bool cpu_has_avx2() { return false; }
bool cpu_has_avx512() { return false; }
#endif

std::atomic<bool> g_simd{true};
std::atomic<bool> g_avx512{true};

inline bool use_simd() { return g_simd.load(std::memory_order_relaxed) && cpu_has_avx2(); }
inline bool use_avx512() { return use_simd() && g_avx512.load(std::memory_order_relaxed) && cpu_has_avx512(); }

}  // namespace

bool simd_enabled() { return use_simd(); }
void set_simd_enabled(bool on) { g_simd.store(on); }
bool avx512_enabled() { return use_avx512(); }
void set_avx512_enabled(bool on) { g_avx512.store(on); }

int64_t quantize_4bit_blocks(const void* x, FloatFormat fmt, int64_t numel, int blocksize, const CodeBook& cb,
                             uint8_t* codes, float* absmax, int64_t block_begin, int64_t block_end) {
  const bool simd = use_simd();
  int64_t nonfinite = 0;
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t start = b * blocksize;
    const int64_t n = std::min<int64_t>(blocksize, numel - start);
#if QLORA_X86
    if (simd && n == blocksize) {
      nonfinite += quantize_block_avx2(x, fmt, start, blocksize, cb, codes, absmax + b);
      continue;
    }
#endif
    nonfinite += quantize_block_scalar(x, fmt, start, n, cb, codes, absmax + b);
  }
  (void)simd;
  return nonfinite;
}

namespace {
// Decodes blocks [block_begin, block_end); element e goes to out[e - out_first_element].
void dequantize_blocks_to(const uint8_t* codes, const AbsmaxSource& absmax, int64_t numel, int blocksize,
                          const CodeBook& cb, void* out, int64_t out_first_element, FloatFormat fmt,
                          int64_t block_begin, int64_t block_end) {
  const bool simd = use_simd(), avx512 = use_avx512();
  char* out_bytes = static_cast<char*>(out);
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t start = b * blocksize;
    const int64_t n = std::min<int64_t>(blocksize, numel - start);
    const float amax = decoded_absmax(absmax, b);
    void* dst = out_bytes + (start - out_first_element) * element_bytes(fmt);
#if QLORA_X86
    if (avx512 && n == blocksize) {
      dequantize_block_avx512(codes, amax, start, blocksize, cb, dst, fmt);
      continue;
    }
    if (simd && n == blocksize) {
      dequantize_block_avx2(codes, amax, start, blocksize, cb, dst, fmt);
      continue;
    }
#endif
    dequantize_block_scalar(codes, amax, start, n, cb, dst, fmt);
  }
  (void)simd;
  (void)avx512;
}
}  // namespace

void dequantize_4bit_blocks(const uint8_t* codes, const AbsmaxSource& absmax, int64_t numel, int blocksize,
                            const CodeBook& cb, void* out, FloatFormat fmt, int64_t block_begin, int64_t block_end) {
  dequantize_blocks_to(codes, absmax, numel, blocksize, cb, out, 0, fmt, block_begin, block_end);
}

void dequantize_4bit_rows(const uint8_t* codes, const AbsmaxSource& absmax, int64_t rows, int64_t cols,
                          int blocksize, const CodeBook& cb, void* out, FloatFormat fmt, int64_t row_begin,
                          int64_t row_end) {
  dequantize_blocks_to(codes, absmax, rows * cols, blocksize, cb, out, row_begin * cols, fmt,
                       row_begin * cols / blocksize, row_end * cols / blocksize);
}

// ---- double quantization -------------------------------------------------------------------------
namespace {
// Pairwise tree over a power-of-two array, the order a shared-memory reduction uses:
// for stride = n/2 .. 1: v[t] += v[t + stride] for t < stride.
void tree_fold(double* v, int n) {
  for (int stride = n / 2; stride > 0; stride /= 2) {
    for (int t = 0; t < stride; ++t) v[t] += v[t + stride];
  }
}
}  // namespace

double absmax_chunk_sum(const float* absmax, int64_t nblocks, int64_t chunk) {
  double v[kAbsmaxChunk];
  for (int t = 0; t < kAbsmaxChunk; ++t) {
    const int64_t i = chunk * kAbsmaxChunk + t;
    v[t] = i < nblocks ? double(absmax[i]) : 0.0;
  }
  tree_fold(v, kAbsmaxChunk);
  return v[0];
}

float absmax_mean(const double* chunk_sums, int64_t nchunks, int64_t nblocks) {
  double lanes[kMeanLanes] = {};
  for (int64_t i = 0; i < nchunks; ++i) lanes[i % kMeanLanes] += chunk_sums[i];
  tree_fold(lanes, kMeanLanes);
  return float(lanes[0] / double(nblocks));
}

void absmax_encode_chunk(const float* absmax, int64_t nblocks, int64_t chunk, float mean, uint8_t* codes,
                         float* chunk_scale_out) {
  const int64_t begin = chunk * kAbsmaxChunk, end = std::min<int64_t>(begin + kAbsmaxChunk, nblocks);
  float max_dev = 0.0f;
  for (int64_t i = begin; i < end; ++i) {
    const float d = std::fabs(sub_rn(absmax[i], mean));
    max_dev = d > max_dev ? d : max_dev;
  }
  const float scale = chunk_scale(max_dev);
  chunk_scale_out[chunk] = scale;
  for (int64_t i = begin; i < end; ++i) codes[i] = encode_absmax(absmax[i], scale, mean);
}

void absmax_decode(const uint8_t* codes, const float* chunk_scale, float mean, int64_t nblocks, float* out) {
  for (int64_t i = 0; i < nblocks; ++i) out[i] = decode_absmax(codes[i], chunk_scale[i / kAbsmaxChunk], mean);
}

}  // namespace qlora::cpu
