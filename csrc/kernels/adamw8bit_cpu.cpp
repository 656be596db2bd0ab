// CPU kernel of the 8-bit-state AdamW step: per 256-element block, dequantize both states into float32
// scratch, run the 32-bit kernel's update on them (adamw_cpu.h: AVX2 or scalar, the same bits), fold the new
// absmax and requantize (a bucketed search or adamw8bit_core.h's binary search, the same codes). With AVX-512
// (set_cpu_avx512) a full block runs in 16 lanes instead: map lookups in registers, the update and both absmax
// in one pass, the bucketed search as one gather per 16 codes; the same bits again. An AVX2 gather version of
// the binary search was no faster than the scalar one on the AMD EPYC build machine.
#include "adamw8bit_cpu.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "adamw_cpu.h"
#include "quantize_cpu.h"  // simd_enabled(), avx512_enabled()

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define QLORA_X86 1
#endif

namespace qlora::cpu {
namespace {

constexpr int kBlock = kAdamW8bitBlock;

void encode_scalar(const float* x, int n, const DynamicMap& map, float prescale, float inverse, uint8_t* codes) {
  for (int i = 0; i < n; ++i) codes[i] = dynamic_quantize(x[i], map.mid, prescale, inverse);
}

// The same code (the number of midpoints strictly below s) found faster: floats are bucketed by their sign,
// exponent and top 7 mantissa bits (an order-preserving integer key >> 16), so that no bucket holds more than
// one midpoint (checked when the table is built). A bucket's 32-bit entry is the number of midpoints below it
// (high half) and the low 16 bits of the key of the midpoint inside it (0xFFFF when none): the code is the
// first plus one if s's low key bits are above the second. One load instead of eight dependent ones.
struct BucketEncoder {
  static constexpr int kShift = 16;
  static constexpr uint32_t kBuckets = 1u << (32 - kShift);
  static constexpr uint32_t kLowMask = (1u << kShift) - 1;
  std::vector<uint32_t> entry;

  static uint32_t order_key(float f) {  // monotonic in f (NaN aside); -0 just below +0 (no midpoint is 0)
    const uint32_t b = f32_bits(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  }

  explicit BucketEncoder(const DynamicMap& map) : entry(kBuckets) {
    std::vector<uint32_t> keys;
    for (int c = 0; c + 1 < kDynamicMapSize; ++c) keys.push_back(order_key(map.mid[c]));  // sorted; mid[255] = inf
    size_t below = 0;
    for (uint32_t b = 0; b < kBuckets; ++b) {
      const uint64_t lo = uint64_t(b) << kShift, hi = lo + (uint64_t(1) << kShift);
      while (below < keys.size() && keys[below] < lo) ++below;
      size_t inside = below;
      while (inside < keys.size() && keys[inside] < hi) ++inside;
      if (inside - below > 1) throw std::logic_error("BucketEncoder: two midpoints in one bucket");
      entry[b] = uint32_t(below) << kShift | (inside > below ? keys[below] & kLowMask : kLowMask);
    }
  }

  uint8_t encode(float s) const {
    if (s != s) return 0;  // NaN: code 0, as the binary search gives
    const uint32_t key = order_key(s), e = entry[key >> kShift];
    return uint8_t((e >> kShift) + ((key & kLowMask) > (e & kLowMask) ? 1u : 0u));
  }
};

const BucketEncoder& bucket_encoder(bool is_signed) {
  static const BucketEncoder signed_enc(dynamic_map(true)), unsigned_enc(dynamic_map(false));
  return is_signed ? signed_enc : unsigned_enc;
}

void encode_bucketed(const float* x, int n, const BucketEncoder& enc, float prescale, float inverse,
                     uint8_t* codes) {
  for (int i = 0; i < n; ++i) codes[i] = enc.encode(normalise(x[i], prescale, inverse));
}

// simd (set_cpu_simd): the bucketed search, else the shared binary search; both give the same codes.
void encode(const float* x, int n, const DynamicMap& map, bool is_signed, float absmax, uint8_t* codes, bool simd) {
  const float prescale = absmax_prescale(absmax), inverse = block_inverse(absmax);
  if (simd) return encode_bucketed(x, n, bucket_encoder(is_signed), prescale, inverse, codes);
  encode_scalar(x, n, map, prescale, inverse, codes);
}

float block_absmax(const float* x, int n) {
  float acc = 0.0f;
  for (int i = 0; i < n; ++i) acc = absmax_fold(acc, x[i]);
  return acc;
}

void decode(const uint8_t* codes, int n, const DynamicMap& map, float absmax, float* out) {
  for (int i = 0; i < n; ++i) out[i] = dynamic_decode(codes[i], map.value, absmax);
}

int64_t element_size(FloatFormat f) { return f == FloatFormat::F32 ? 4 : 2; }

// Block b (0-based within t) of one tensor.
void step_block(const AdamW8bitTensor& t, const AdamWGroup& group, int64_t b, const DynamicMap& map1,
                const DynamicMap& map2, bool simd) {
  alignas(64) float m[kBlock], v[kBlock];
  const int64_t begin = b * kBlock;
  const int n = int(std::min<int64_t>(kBlock, t.numel - begin));
  decode(t.exp_avg_codes + begin, n, map1, t.exp_avg_absmax[b], m);
  decode(t.exp_avg_sq_codes + begin, n, map2, t.exp_avg_sq_absmax[b], v);
  AdamWTensor x;
  const int64_t es = element_size(t.format);
  x.param = static_cast<char*>(t.param) + begin * es;
  x.grad = static_cast<const char*>(t.grad) + begin * es;
  x.exp_avg = m;
  x.exp_avg_sq = v;
  x.numel = n;
  x.neg_step_size = t.neg_step_size;
  x.bias_correction2_sqrt = t.bias_correction2_sqrt;
  x.format = t.format;
  adamw_step_range(x, group, 0, n);
  const float absmax1 = block_absmax(m, n), absmax2 = block_absmax(v, n);
  encode(m, n, map1, true, absmax1, t.exp_avg_codes + begin, simd);
  encode(v, n, map2, false, absmax2, t.exp_avg_sq_codes + begin, simd);
  t.exp_avg_absmax[b] = absmax1;
  t.exp_avg_sq_absmax[b] = absmax2;
}

#if QLORA_X86
// ---- AVX-512 path: a full block in passes of 16 lanes, the scalar path's operations and bits --------------
// Both states are decoded into scratch (map lookups in registers); one pass runs the update (adamw_core.h's
// operations in its order: the same two FMAs, nothing else fused), stores the parameter and folds both absmax
// as lane-wise maxima (vmaxps(a, acc) is `a > acc ? a : acc`, absmax_fold's rule, and the maximum of non-NaN
// values does not depend on the order); then both states are encoded with the bucket table (one gather of the
// buckets' entries and a compare per 16 codes).
#define QLORA_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,f16c,fma")))

// GCC 12 warns (falsely) that the plain forms of many AVX-512 intrinsics use an uninitialized value; their
// maskz / mask forms with all 16 lanes set are the same instructions without the warning.
constexpr __mmask16 kAll16 = 0xFFFF;

QLORA_AVX512 inline __m512i widen_u8(const uint8_t* x) {
  return _mm512_maskz_cvtepu8_epi32(kAll16, _mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
}

// A full block's decode: map[code] * absmax. The 256-entry lookup is done in registers: vpermt2ps picks from
// each 32-entry piece of the map by the code's low 5 bits, and three rounds of blends by bits 5, 6 and 7 keep
// the right piece (about 3x faster than a 16-lane gather from the map on the AMD EPYC build machine).
QLORA_AVX512 void decode_block_avx512(const uint8_t* codes, const DynamicMap& map, float absmax, float* out) {
  __m512 table[16];
  for (int k = 0; k < 16; ++k) table[k] = _mm512_loadu_ps(map.value + 16 * k);
  const __m512 scale = _mm512_set1_ps(absmax);
  for (int i = 0; i < kBlock; i += 16) {
    const __m512i idx = widen_u8(codes + i);
    __m512 piece[8];
    for (int k = 0; k < 8; ++k) piece[k] = _mm512_permutex2var_ps(table[2 * k], idx, table[2 * k + 1]);
    const __mmask16 bit5 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(32));
    const __mmask16 bit6 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(64));
    const __mmask16 bit7 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(128));
    for (int k = 0; k < 4; ++k) piece[k] = _mm512_mask_blend_ps(bit5, piece[2 * k], piece[2 * k + 1]);
    for (int k = 0; k < 2; ++k) piece[k] = _mm512_mask_blend_ps(bit6, piece[2 * k], piece[2 * k + 1]);
    _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_mask_blend_ps(bit7, piece[0], piece[1]), scale));
  }
}

template <FloatFormat F>
QLORA_AVX512 inline __m512 load16(const void* x, int i) {
  if constexpr (F == FloatFormat::F32) {
    return _mm512_loadu_ps(static_cast<const float*>(x) + i);
  } else {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(x) + i));
    if constexpr (F == FloatFormat::F16) return _mm512_maskz_cvtph_ps(kAll16, h);
    const __m512i wide = _mm512_maskz_cvtepu16_epi32(kAll16, h);
    return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(kAll16, wide, 16));  // bf16: exact widening
  }
}

template <FloatFormat F>
QLORA_AVX512 inline void store16(void* x, int i, __m512 v) {
  if constexpr (F == FloatFormat::F32) {
    _mm512_storeu_ps(static_cast<float*>(x) + i, v);
    return;
  }
  __m256i half;
  if constexpr (F == FloatFormat::F16) {
    half = _mm512_maskz_cvtps_ph(kAll16, v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  } else {
    // bf16 as f32_to_bf16_rn: add 0x7FFF + lsb and truncate; NaN keeps its top bits and is made quiet.
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i top = _mm512_maskz_srli_epi32(kAll16, bits, 16);
    const __m512i bias = _mm512_add_epi32(_mm512_and_si512(top, _mm512_set1_epi32(1)), _mm512_set1_epi32(0x7FFF));
    const __m512i rounded = _mm512_maskz_srli_epi32(kAll16, _mm512_add_epi32(bits, bias), 16);
    const __mmask16 is_nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    half = _mm512_maskz_cvtepi32_epi16(kAll16, _mm512_mask_or_epi32(rounded, is_nan, top, _mm512_set1_epi32(0x40)));
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(x) + i), half);
}

// Codes of 16 normalised values: BucketEncoder::encode on 16 lanes.
QLORA_AVX512 inline __m128i encode16(__m512 s, const BucketEncoder& enc) {
  const __m512i b = _mm512_castps_si512(s);
  // order_key: ~b for negative b, b | sign bit otherwise, i.e. b ^ ((b >> 31 arithmetic) | sign bit)
  const __m512i sign_fill = _mm512_maskz_srai_epi32(kAll16, b, 31);
  const __m512i key = _mm512_xor_si512(b, _mm512_or_si512(sign_fill, _mm512_set1_epi32(INT32_MIN)));
  const __m512i bucket = _mm512_maskz_srli_epi32(kAll16, key, BucketEncoder::kShift);
  const __m512i e = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), kAll16, bucket, enc.entry.data(), 4);
  const __m512i low_mask = _mm512_set1_epi32(BucketEncoder::kLowMask);
  const __mmask16 above = _mm512_cmpgt_epu32_mask(_mm512_and_si512(key, low_mask), _mm512_and_si512(e, low_mask));
  __m512i c = _mm512_maskz_srli_epi32(kAll16, e, BucketEncoder::kShift);
  c = _mm512_mask_add_epi32(c, above, c, _mm512_set1_epi32(1));
  c = _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(s, s, _CMP_ORD_Q), c);  // NaN: code 0
  return _mm512_maskz_cvtepi32_epi8(kAll16, c);
}

QLORA_AVX512 void encode_block_avx512(const float* x, const BucketEncoder& enc, float absmax, uint8_t* codes) {
  const __m512 prescale = _mm512_set1_ps(absmax_prescale(absmax)), inverse = _mm512_set1_ps(block_inverse(absmax));
  for (int i = 0; i < kBlock; i += 16) {
    const __m512 s = _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(x + i), prescale), inverse);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i), encode16(s, enc));
  }
}

QLORA_AVX512 inline float reduce_max(__m512 acc) {
  // all lanes are >= +0 and not NaN, so any order of maxima gives the scalar fold's result
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, acc);
  float r = 0.0f;
  for (float a : lanes) r = a > r ? a : r;
  return r;
}

// Block b (full, kBlock elements) of one tensor: step_block's bits.
template <FloatFormat F>
QLORA_AVX512 void step_block_avx512(const AdamW8bitTensor& t, const AdamWGroup& h, int64_t b, const DynamicMap& map1,
                                    const DynamicMap& map2) {
  alignas(64) float m_buf[kBlock], v_buf[kBlock];
  const int64_t begin = b * kBlock;
  const int64_t es = element_size(F);
  void* param = static_cast<char*>(t.param) + begin * es;
  const void* grad = static_cast<const char*>(t.grad) + begin * es;
  uint8_t* codes1 = t.exp_avg_codes + begin;
  uint8_t* codes2 = t.exp_avg_sq_codes + begin;
  decode_block_avx512(codes1, map1, t.exp_avg_absmax[b], m_buf);
  decode_block_avx512(codes2, map2, t.exp_avg_sq_absmax[b], v_buf);
  const __m512 grad_sign = _mm512_set1_ps(h.grad_sign), decay = _mm512_set1_ps(h.decay);
  const __m512 lerp_coeff = _mm512_set1_ps(h.lerp_coeff), beta2 = _mm512_set1_ps(h.beta2);
  const __m512 omb2 = _mm512_set1_ps(h.one_minus_beta2), eps = _mm512_set1_ps(h.eps);
  const __m512 neg_step = _mm512_set1_ps(t.neg_step_size), bc2 = _mm512_set1_ps(t.bias_correction2_sqrt);
  __m512 acc1 = _mm512_setzero_ps(), acc2 = _mm512_setzero_ps();
  for (int i = 0; i < kBlock; i += 16) {
    __m512 m = _mm512_load_ps(m_buf + i);
    __m512 v = _mm512_load_ps(v_buf + i);
    const __m512 g = _mm512_mul_ps(load16<F>(grad, i), grad_sign);
    __m512 p = _mm512_mul_ps(load16<F>(param, i), decay);
    m = _mm512_fmadd_ps(lerp_coeff, _mm512_sub_ps(g, m), h.lerp_from_grad ? g : m);   // fma_rn, as adamw_update
    v = _mm512_fmadd_ps(_mm512_mul_ps(omb2, g), g, _mm512_mul_ps(v, beta2));          // fma_rn, as adamw_update
    const __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_maskz_sqrt_ps(kAll16, v), bc2), eps);
    p = _mm512_add_ps(p, _mm512_div_ps(_mm512_mul_ps(neg_step, m), denom));
    store16<F>(param, i, p);
    _mm512_store_ps(m_buf + i, m);
    _mm512_store_ps(v_buf + i, v);
    acc1 = _mm512_maskz_max_ps(kAll16, _mm512_abs_ps(m), acc1);
    acc2 = _mm512_maskz_max_ps(kAll16, _mm512_abs_ps(v), acc2);
  }
  const float absmax1 = reduce_max(acc1), absmax2 = reduce_max(acc2);
  encode_block_avx512(m_buf, bucket_encoder(true), absmax1, codes1);
  encode_block_avx512(v_buf, bucket_encoder(false), absmax2, codes2);
  t.exp_avg_absmax[b] = absmax1;
  t.exp_avg_sq_absmax[b] = absmax2;
}

// quantize_8bit_dynamic_blocks on one full block: returns its absmax.
QLORA_AVX512 float quantize_block_avx512(const float* x, const BucketEncoder& enc, uint8_t* codes) {
  __m512 acc = _mm512_setzero_ps();
  for (int i = 0; i < kBlock; i += 16) acc = _mm512_maskz_max_ps(kAll16, _mm512_abs_ps(_mm512_loadu_ps(x + i)), acc);
  const float absmax = reduce_max(acc);
  encode_block_avx512(x, enc, absmax, codes);
  return absmax;
}

bool cpu_has_avx512_step() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}
#endif

}  // namespace

const DynamicMap& dynamic_map(bool is_signed) {
  static const DynamicMap signed_map = make_dynamic_map(true), unsigned_map = make_dynamic_map(false);
  return is_signed ? signed_map : unsigned_map;
}

void adamw8bit_step_blocks(const AdamW8bitTensor* tensors, int64_t ntensors, const AdamWGroup& group,
                           int64_t block_begin, int64_t block_end) {
  if (ntensors <= 0 || block_begin >= block_end) return;
  const bool simd = simd_enabled();
#if QLORA_X86
  const bool avx512 = avx512_enabled() && cpu_has_avx512_step();
#endif
  const DynamicMap &map1 = dynamic_map(true), &map2 = dynamic_map(false);
  // The tensor holding block_begin: the last one whose first block is not after it.
  int64_t t = std::upper_bound(tensors, tensors + ntensors, block_begin,
                               [](int64_t b, const AdamW8bitTensor& x) { return b < x.first_block; }) -
              tensors - 1;
  int64_t block = block_begin;
  for (; t < ntensors && block < block_end; ++t) {
    const AdamW8bitTensor& x = tensors[t];
    const int64_t last = std::min(block_end, x.first_block + adamw8bit_blocks(x.numel));
    for (; block < last; ++block) {
      const int64_t b = block - x.first_block;
#if QLORA_X86
      if (avx512 && (b + 1) * kBlock <= x.numel) {  // full blocks; a tensor's last, partial one goes below
        switch (x.format) {
          case FloatFormat::F16: step_block_avx512<FloatFormat::F16>(x, group, b, map1, map2); break;
          case FloatFormat::BF16: step_block_avx512<FloatFormat::BF16>(x, group, b, map1, map2); break;
          default: step_block_avx512<FloatFormat::F32>(x, group, b, map1, map2); break;
        }
        continue;
      }
#endif
      step_block(x, group, b, map1, map2, simd);
    }
  }
}

void quantize_8bit_dynamic_blocks(const float* x, int64_t n, bool is_signed, uint8_t* codes, float* absmax,
                                  int64_t block_begin, int64_t block_end) {
  const bool simd = simd_enabled();
#if QLORA_X86
  const bool avx512 = avx512_enabled() && cpu_has_avx512_step();
#endif
  const DynamicMap& map = dynamic_map(is_signed);
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t begin = b * kBlock;
    const int len = int(std::min<int64_t>(kBlock, n - begin));
#if QLORA_X86
    if (avx512 && len == kBlock) {
      absmax[b] = quantize_block_avx512(x + begin, bucket_encoder(is_signed), codes + begin);
      continue;
    }
#endif
    absmax[b] = block_absmax(x + begin, len);
    encode(x + begin, len, map, is_signed, absmax[b], codes + begin, simd);
  }
}

void dequantize_8bit_dynamic_blocks(const uint8_t* codes, const float* absmax, int64_t n, bool is_signed, float* out,
                                    int64_t block_begin, int64_t block_end) {
#if QLORA_X86
  const bool avx512 = avx512_enabled() && cpu_has_avx512_step();
#endif
  const DynamicMap& map = dynamic_map(is_signed);
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t begin = b * kBlock;
    const int len = int(std::min<int64_t>(kBlock, n - begin));
#if QLORA_X86
    if (avx512 && len == kBlock) {
      decode_block_avx512(codes + begin, map, absmax[b], out + begin);
      continue;
    }
#endif
    decode(codes + begin, len, map, absmax[b], out + begin);
  }
}

}  // namespace qlora::cpu
