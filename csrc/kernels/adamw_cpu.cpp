// CPU kernel of the multi-tensor AdamW step: a scalar path (adamw_core.h, element by element) and an
// AVX2 + FMA path doing the same operations on 8 lanes (the same FMAs and nothing else fused, so the
// bits are the scalar path's).
#include "adamw_cpu.h"

#include <algorithm>

#include "quantize_cpu.h"  // simd_enabled()

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define QLORA_X86 1
#endif

namespace qlora::cpu {
namespace {

template <FloatFormat F>
inline float load_f32(const void* x, int64_t i) {
  if constexpr (F == FloatFormat::F16) return f16_to_f32(static_cast<const uint16_t*>(x)[i]);
  if constexpr (F == FloatFormat::BF16) return bf16_to_f32(static_cast<const uint16_t*>(x)[i]);
  if constexpr (F == FloatFormat::F32) return static_cast<const float*>(x)[i];
}

template <FloatFormat F>
inline void store_f32(void* x, int64_t i, float v) {
  if constexpr (F == FloatFormat::F16) static_cast<uint16_t*>(x)[i] = f32_to_f16_rn(v);
  if constexpr (F == FloatFormat::BF16) static_cast<uint16_t*>(x)[i] = f32_to_bf16_rn(v);
  if constexpr (F == FloatFormat::F32) static_cast<float*>(x)[i] = v;
}

template <FloatFormat F>
void step_scalar(const AdamWTensor& t, const AdamWGroup& h, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    float m = t.exp_avg[i], v = t.exp_avg_sq[i];
    const float p = adamw_update(load_f32<F>(t.param, i), load_f32<F>(t.grad, i), m, v, h, t.neg_step_size,
                                 t.bias_correction2_sqrt);
    t.exp_avg[i] = m;
    t.exp_avg_sq[i] = v;
    store_f32<F>(t.param, i, p);
  }
}

#if QLORA_X86
template <FloatFormat F>
__attribute__((target("avx2,f16c,fma"))) inline __m256 load8(const void* x, int64_t i) {
  if constexpr (F == FloatFormat::F32) {
    return _mm256_loadu_ps(static_cast<const float*>(x) + i);
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + i));
    if constexpr (F == FloatFormat::F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));  // bf16: exact widening
  }
}

template <FloatFormat F>
__attribute__((target("avx2,f16c,fma"))) inline void store8(void* x, int64_t i, __m256 v) {
  if constexpr (F == FloatFormat::F32) {
    _mm256_storeu_ps(static_cast<float*>(x) + i, v);
  } else if constexpr (F == FloatFormat::F16) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(x) + i),
                     _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    // bf16, round to nearest even as f32_to_bf16_rn: add 0x7FFF + lsb and truncate; NaN keeps its top bits
    // and is made quiet.
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i rounded =
        _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    const __m256i quiet_nan = _mm256_or_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x40));
    const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    const __m256i r = _mm256_blendv_epi8(rounded, quiet_nan, is_nan);
    // packus works within 128-bit lanes: [r0..3 r0..3 | r4..7 r4..7]; gather quadwords 0 and 2.
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(x) + i), _mm256_castsi256_si128(packed));
  }
}

// The scalar path's operations, in its order, on 8 lanes.
template <FloatFormat F>
__attribute__((target("avx2,f16c,fma"))) void step_avx2(const AdamWTensor& t, const AdamWGroup& h, int64_t begin,
                                                    int64_t end) {
  const __m256 grad_sign = _mm256_set1_ps(h.grad_sign), decay = _mm256_set1_ps(h.decay);
  const __m256 lerp_coeff = _mm256_set1_ps(h.lerp_coeff), beta2 = _mm256_set1_ps(h.beta2);
  const __m256 omb2 = _mm256_set1_ps(h.one_minus_beta2), eps = _mm256_set1_ps(h.eps);
  const __m256 neg_step = _mm256_set1_ps(t.neg_step_size), bc2 = _mm256_set1_ps(t.bias_correction2_sqrt);
  int64_t i = begin;
  for (; i + 8 <= end; i += 8) {
    const __m256 g = _mm256_mul_ps(load8<F>(t.grad, i), grad_sign);
    __m256 p = _mm256_mul_ps(load8<F>(t.param, i), decay);
    __m256 m = _mm256_loadu_ps(t.exp_avg + i);
    __m256 v = _mm256_loadu_ps(t.exp_avg_sq + i);
    m = _mm256_fmadd_ps(lerp_coeff, _mm256_sub_ps(g, m), h.lerp_from_grad ? g : m);
    v = _mm256_fmadd_ps(_mm256_mul_ps(omb2, g), g, _mm256_mul_ps(v, beta2));
    const __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(v), bc2), eps);
    p = _mm256_add_ps(p, _mm256_div_ps(_mm256_mul_ps(neg_step, m), denom));
    _mm256_storeu_ps(t.exp_avg + i, m);
    _mm256_storeu_ps(t.exp_avg_sq + i, v);
    store8<F>(t.param, i, p);
  }
  step_scalar<F>(t, h, i, end);
}

bool cpu_has_avx2_fma() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma");
}
#else
bool cpu_has_avx2_fma() { return false; }
#endif

template <FloatFormat F>
void step_range(const AdamWTensor& t, const AdamWGroup& h, int64_t begin, int64_t end, bool simd) {
#if QLORA_X86
  if (simd) return step_avx2<F>(t, h, begin, end);
#endif
  (void)simd;
  step_scalar<F>(t, h, begin, end);
}

void step_range_any(const AdamWTensor& x, const AdamWGroup& group, int64_t begin, int64_t end, bool simd) {
  switch (x.format) {
    case FloatFormat::F16: step_range<FloatFormat::F16>(x, group, begin, end, simd); break;
    case FloatFormat::BF16: step_range<FloatFormat::BF16>(x, group, begin, end, simd); break;
    default: step_range<FloatFormat::F32>(x, group, begin, end, simd); break;
  }
}

}  // namespace

void adamw_step_range(const AdamWTensor& tensor, const AdamWGroup& group, int64_t begin, int64_t end) {
  step_range_any(tensor, group, begin, end, simd_enabled() && cpu_has_avx2_fma());
}

void adamw_step_chunks(const AdamWTensor* tensors, int64_t ntensors, const AdamWGroup& group, int64_t chunk_begin,
                       int64_t chunk_end) {
  if (ntensors <= 0 || chunk_begin >= chunk_end) return;
  const bool simd = simd_enabled() && cpu_has_avx2_fma();
  // The tensor holding chunk_begin: the last one whose first chunk is not after it.
  int64_t t = std::upper_bound(tensors, tensors + ntensors, chunk_begin,
                               [](int64_t c, const AdamWTensor& x) { return c < x.first_chunk; }) -
              tensors - 1;
  int64_t chunk = chunk_begin;
  for (; t < ntensors && chunk < chunk_end; ++t) {
    const AdamWTensor& x = tensors[t];
    const int64_t chunks = (x.numel + kAdamWCpuChunk - 1) / kAdamWCpuChunk;
    const int64_t last = std::min(chunk_end, x.first_chunk + chunks);  // one past this tensor's last chunk here
    if (chunk >= last) continue;
    const int64_t begin = (chunk - x.first_chunk) * kAdamWCpuChunk;
    const int64_t end = std::min(x.numel, (last - x.first_chunk) * kAdamWCpuChunk);
    step_range_any(x, group, begin, end, simd);
    chunk = last;
  }
}

}  // namespace qlora::cpu
