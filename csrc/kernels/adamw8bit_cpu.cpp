// CPU kernel of the 8-bit-state AdamW step: per 256-element block, dequantize both states into float32
// scratch, run the 32-bit kernel's update on them (adamw_cpu.h: AVX2 or scalar, the same bits), fold the new
// absmax and requantize (an AVX2 gather-based binary search or the scalar one, the same codes).
#include "adamw8bit_cpu.h"

#include <algorithm>
#include <cstring>

#include "adamw_cpu.h"
#include "quantize_cpu.h"  // simd_enabled()

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

#if QLORA_X86
// dynamic_quantize on 8 lanes: the same two roundings of normalise(), the same midpoint comparisons.
__attribute__((target("avx2"))) void encode_avx2(const float* x, int n, const DynamicMap& map, float prescale,
                                                 float inverse, uint8_t* codes) {
  const __m256 pre = _mm256_set1_ps(prescale), inv = _mm256_set1_ps(inverse);
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 s = _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), pre), inv);
    __m256i c = _mm256_setzero_si256();
    for (int step = 128; step > 0; step >>= 1) {
      const __m256i idx = _mm256_add_epi32(c, _mm256_set1_epi32(step - 1));
      const __m256 mid = _mm256_i32gather_ps(map.mid, idx, 4);
      const __m256i above = _mm256_castps_si256(_mm256_cmp_ps(s, mid, _CMP_GT_OQ));  // false for NaN
      c = _mm256_add_epi32(c, _mm256_and_si256(above, _mm256_set1_epi32(step)));
    }
    // 8 int32 codes (< 256) to 8 bytes
    const __m256i bytes = _mm256_shuffle_epi8(
        c, _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 4, 8, 12, -1, -1, -1,
                            -1, -1, -1, -1, -1, -1, -1, -1, -1));
    const uint32_t lo = uint32_t(_mm256_extract_epi32(bytes, 0)), hi = uint32_t(_mm256_extract_epi32(bytes, 4));
    const uint64_t packed = uint64_t(lo) | (uint64_t(hi) << 32);
    std::memcpy(codes + i, &packed, 8);
  }
  encode_scalar(x + i, n - i, map, prescale, inverse, codes + i);
}

bool cpu_has_avx2() { return __builtin_cpu_supports("avx2"); }
#else
bool cpu_has_avx2() { return false; }
#endif

void encode(const float* x, int n, const DynamicMap& map, float absmax, uint8_t* codes, bool simd) {
  const float prescale = absmax_prescale(absmax), inverse = block_inverse(absmax);
#if QLORA_X86
  if (simd) return encode_avx2(x, n, map, prescale, inverse, codes);
#endif
  (void)simd;
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
  encode(m, n, map1, absmax1, t.exp_avg_codes + begin, simd);
  encode(v, n, map2, absmax2, t.exp_avg_sq_codes + begin, simd);
  t.exp_avg_absmax[b] = absmax1;
  t.exp_avg_sq_absmax[b] = absmax2;
}

}  // namespace

const DynamicMap& dynamic_map(bool is_signed) {
  static const DynamicMap signed_map = make_dynamic_map(true), unsigned_map = make_dynamic_map(false);
  return is_signed ? signed_map : unsigned_map;
}

void adamw8bit_step_blocks(const AdamW8bitTensor* tensors, int64_t ntensors, const AdamWGroup& group,
                           int64_t block_begin, int64_t block_end) {
  if (ntensors <= 0 || block_begin >= block_end) return;
  const bool simd = simd_enabled() && cpu_has_avx2();
  const DynamicMap &map1 = dynamic_map(true), &map2 = dynamic_map(false);
  // The tensor holding block_begin: the last one whose first block is not after it.
  int64_t t = std::upper_bound(tensors, tensors + ntensors, block_begin,
                               [](int64_t b, const AdamW8bitTensor& x) { return b < x.first_block; }) -
              tensors - 1;
  int64_t block = block_begin;
  for (; t < ntensors && block < block_end; ++t) {
    const AdamW8bitTensor& x = tensors[t];
    const int64_t last = std::min(block_end, x.first_block + adamw8bit_blocks(x.numel));
    for (; block < last; ++block) step_block(x, group, block - x.first_block, map1, map2, simd);
  }
}

void quantize_8bit_dynamic_blocks(const float* x, int64_t n, bool is_signed, uint8_t* codes, float* absmax,
                                  int64_t block_begin, int64_t block_end) {
  const bool simd = simd_enabled() && cpu_has_avx2();
  const DynamicMap& map = dynamic_map(is_signed);
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t begin = b * kBlock;
    const int len = int(std::min<int64_t>(kBlock, n - begin));
    absmax[b] = block_absmax(x + begin, len);
    encode(x + begin, len, map, absmax[b], codes + begin, simd);
  }
}

void dequantize_8bit_dynamic_blocks(const uint8_t* codes, const float* absmax, int64_t n, bool is_signed, float* out,
                                    int64_t block_begin, int64_t block_end) {
  const DynamicMap& map = dynamic_map(is_signed);
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t begin = b * kBlock;
    decode(codes + begin, int(std::min<int64_t>(kBlock, n - begin)), map, absmax[b], out + begin);
  }
}

}  // namespace qlora::cpu
