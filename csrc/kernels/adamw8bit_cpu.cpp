// CPU kernel of the 8-bit-state AdamW step: per 256-element block, dequantize both states into float32
// scratch, run the 32-bit kernel's update on them (adamw_cpu.h: AVX2 or scalar, the same bits), fold the new
// absmax and requantize (a bucketed search or adamw8bit_core.h's binary search, the same codes). An AVX2
// gather version of the binary search was no faster than the scalar one on the AMD EPYC build machine.
#include "adamw8bit_cpu.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "adamw_cpu.h"
#include "quantize_cpu.h"  // simd_enabled()


namespace qlora::cpu {
namespace {

constexpr int kBlock = kAdamW8bitBlock;

void encode_scalar(const float* x, int n, const DynamicMap& map, float prescale, float inverse, uint8_t* codes) {
  for (int i = 0; i < n; ++i) codes[i] = dynamic_quantize(x[i], map.mid, prescale, inverse);
}

// The same code (the number of midpoints strictly below s) found faster: floats are bucketed by their sign,
// exponent and top 6 mantissa bits (an order-preserving integer key >> 17); a table gives the number of
// midpoints below each bucket, and `steps` comparisons count those inside s's bucket (the most midpoints one
// bucket holds: 1 for the signed map, 2 for the unsigned). Two or three dependent loads instead of eight.
struct BucketEncoder {
  static constexpr int kShift = 17;
  uint8_t start[1u << (32 - kShift)];
  int steps = 0;

  static uint32_t order_key(float f) {  // monotonic in f (NaN aside); -0 just below +0
    const uint32_t b = f32_bits(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  }

  explicit BucketEncoder(const DynamicMap& map) {
    std::vector<uint32_t> keys;
    for (int c = 0; c + 1 < kDynamicMapSize; ++c) keys.push_back(order_key(map.mid[c]));  // sorted; mid[255] = inf
    size_t below = 0;
    for (uint32_t b = 0; b < (1u << (32 - kShift)); ++b) {
      const uint64_t lo = uint64_t(b) << kShift, hi = lo + (uint64_t(1) << kShift);
      while (below < keys.size() && keys[below] < lo) ++below;
      size_t inside = below;
      while (inside < keys.size() && keys[inside] < hi) ++inside;
      start[b] = uint8_t(below);
      steps = std::max(steps, int(inside - below));
    }
  }

  uint8_t encode(float s, const float* mid) const {
    if (s != s) return 0;  // NaN: code 0, as the binary search gives
    uint32_t c = start[order_key(s) >> kShift];
    for (int k = 0; k < steps; ++k) c += s > mid[c] ? 1u : 0u;  // mid[255] = inf stops the count at 255
    return uint8_t(c);
  }
};

const BucketEncoder& bucket_encoder(bool is_signed) {
  static const BucketEncoder signed_enc(dynamic_map(true)), unsigned_enc(dynamic_map(false));
  return is_signed ? signed_enc : unsigned_enc;
}

void encode_bucketed(const float* x, int n, const DynamicMap& map, const BucketEncoder& enc, float prescale,
                     float inverse, uint8_t* codes) {
  for (int i = 0; i < n; ++i) codes[i] = enc.encode(normalise(x[i], prescale, inverse), map.mid);
}

// simd (set_cpu_simd): the bucketed search, else the shared binary search; both give the same codes.
void encode(const float* x, int n, const DynamicMap& map, bool is_signed, float absmax, uint8_t* codes, bool simd) {
  const float prescale = absmax_prescale(absmax), inverse = block_inverse(absmax);
  if (simd) return encode_bucketed(x, n, map, bucket_encoder(is_signed), prescale, inverse, codes);
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

}  // namespace

const DynamicMap& dynamic_map(bool is_signed) {
  static const DynamicMap signed_map = make_dynamic_map(true), unsigned_map = make_dynamic_map(false);
  return is_signed ? signed_map : unsigned_map;
}

void adamw8bit_step_blocks(const AdamW8bitTensor* tensors, int64_t ntensors, const AdamWGroup& group,
                           int64_t block_begin, int64_t block_end) {
  if (ntensors <= 0 || block_begin >= block_end) return;
  const bool simd = simd_enabled();
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
  const bool simd = simd_enabled();
  const DynamicMap& map = dynamic_map(is_signed);
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t begin = b * kBlock;
    const int len = int(std::min<int64_t>(kBlock, n - begin));
    absmax[b] = block_absmax(x + begin, len);
    encode(x + begin, len, map, is_signed, absmax[b], codes + begin, simd);
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
