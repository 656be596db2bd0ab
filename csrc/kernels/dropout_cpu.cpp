// CPU dropout: the Philox words of one 64-element batch (16 groups) at a time, in element order, then one
// multiply per element. The AVX-512 path computes the 16 groups in the lanes of one register (four batches at
// a time for full float32 batches, applied 16 elements per instruction); the portable path calls the scalar
// dropout_core.h function the CUDA kernel also uses. Both give the same words (tested),
// and the multiply is the same correctly rounded one, so every path writes the same bits.
#include "dropout_cpu.h"

#include <algorithm>

#include "quantize_cpu.h"  // simd_enabled(): the one switch that bypasses every vector path

#if defined(__x86_64__) || defined(_M_X64)
#define QLORA_X86 1
#include <immintrin.h>
#else
#define QLORA_X86 0
#endif

namespace qlora::cpu {
namespace {

using BatchWords = uint32_t[kDropoutBatch];  // word of element 64b + j at [j]

void batch_words_scalar(uint64_t seed, int64_t batch, BatchWords& words) {
  for (int l = 0; l < kDropoutBatchGroups; ++l) {
    const int64_t g = batch * kDropoutBatchGroups + l;
    const Philox4 r = dropout_words(seed, uint64_t(g));
    for (int w = 0; w < 4; ++w) words[w * kDropoutBatchGroups + l] = r.v[w];
  }
}

#if QLORA_X86
// 32x32 -> 64-bit products of 16 lanes: vpmuludq multiplies the even lanes, so the odd lanes are shifted
// down first; the high halves are blended back into lane order, the low halves come from vpmulld. (The
// all-ones-mask forms give the same results as the plain intrinsics, which GCC 12 flags with false
// -Wuninitialized warnings.)
__attribute__((target("avx512f"))) inline void mulhilo16(__m512i a, __m512i m, __m512i& hi, __m512i& lo) {
  constexpr __mmask8 kAll = 0xFF;
  const __m512i even = _mm512_maskz_mul_epu32(kAll, a, m);
  const __m512i odd = _mm512_maskz_mul_epu32(kAll, _mm512_maskz_srli_epi64(kAll, a, 32), m);
  hi = _mm512_mask_blend_epi32(__mmask16(0xAAAA), _mm512_maskz_srli_epi64(kAll, even, 32), odd);
  lo = _mm512_mullo_epi32(a, m);
}

// The words of NB consecutive batches (words[n] for batch `batch + n`). Philox's ten rounds are a chain of
// dependent multiplies; several independent batches in flight fill the multiplier's latency (four: 2x
// the speed of one on Zen 4, and 16 of the 32 vector registers).
template <int NB>
__attribute__((target("avx512f"))) void batch_words_avx512(uint64_t seed, int64_t batch, BatchWords* words) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512i c0[NB], c1[NB], c2[NB], c3[NB];
  for (int n = 0; n < NB; ++n) {
    const uint64_t g0 = uint64_t(batch + n) * kDropoutBatchGroups;
    // g0 is a multiple of 16, so adding the lane index never carries into the high word.
    c0[n] = _mm512_add_epi32(_mm512_set1_epi32(int(uint32_t(g0))), lane);
    c1[n] = _mm512_set1_epi32(int(uint32_t(g0 >> 32)));
    c2[n] = _mm512_setzero_si512();
    c3[n] = _mm512_setzero_si512();
  }
  const __m512i m0 = _mm512_set1_epi32(int(kPhiloxM0)), m1 = _mm512_set1_epi32(int(kPhiloxM1));
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  for (int round = 0; round < kPhiloxRounds; ++round) {
    if (round > 0) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    const __m512i key0 = _mm512_set1_epi32(int(k0)), key1 = _mm512_set1_epi32(int(k1));
    for (int n = 0; n < NB; ++n) {
      __m512i hi0, lo0, hi1, lo1;
      mulhilo16(c0[n], m0, hi0, lo0);
      mulhilo16(c2[n], m1, hi1, lo1);
      // 0x96 is the truth table of a ^ b ^ c
      c0[n] = _mm512_ternarylogic_epi32(hi1, c1[n], key0, 0x96);
      c2[n] = _mm512_ternarylogic_epi32(hi0, c3[n], key1, 0x96);
      c1[n] = lo1;
      c3[n] = lo0;
    }
  }
  for (int n = 0; n < NB; ++n) {
    _mm512_store_si512(words[n] + 0 * kDropoutBatchGroups, c0[n]);
    _mm512_store_si512(words[n] + 1 * kDropoutBatchGroups, c1[n]);
    _mm512_store_si512(words[n] + 2 * kDropoutBatchGroups, c2[n]);
    _mm512_store_si512(words[n] + 3 * kDropoutBatchGroups, c3[n]);
  }
}

constexpr int kBatchesInFlight = 4;

// kBatchesInFlight whole float32 batches: y = x * factor with one correctly rounded multiply, as
// dropout_element does, 16 elements per instruction (element 64b + 16w + l takes word w of lane l: 16
// consecutive elements per word register).
__attribute__((target("avx512f"))) void batches_f32_avx512(const float* x, float* y, int64_t batch,
                                                            const DropoutParams& d) {
  alignas(64) BatchWords words[kBatchesInFlight];
  batch_words_avx512<kBatchesInFlight>(d.seed, batch, words);
  const __m512i threshold = _mm512_set1_epi32(int(d.threshold));
  const __m512 scale = _mm512_set1_ps(d.drop_all ? 0.0f : d.scale_f32);
  for (int n = 0; n < kBatchesInFlight; ++n) {
    for (int w = 0; w < 4; ++w) {
      const __m512i word = _mm512_load_si512(words[n] + w * kDropoutBatchGroups);
      const __m512 factor = _mm512_maskz_mov_ps(_mm512_cmpge_epu32_mask(word, threshold), scale);
      const int64_t i = (batch + n) * kDropoutBatch + w * kDropoutBatchGroups;
      _mm512_storeu_ps(y + i, _mm512_mul_ps(_mm512_loadu_ps(x + i), factor));
    }
  }
}

bool use_avx512() { return simd_enabled() && __builtin_cpu_supports("avx512f"); }
#else
bool use_avx512() { return false; }
#endif

template <DropoutDtype T>
void dropout_range(const void* x, void* y, int64_t numel, const DropoutParams& d, int64_t b0, int64_t b1) {
  const bool avx512 = use_avx512();
  alignas(64) BatchWords words;
  for (int64_t b = b0; b < b1; ++b) {
#if QLORA_X86
    if (T == DropoutDtype::F32 && avx512 && b + kBatchesInFlight <= b1 &&
        (b + kBatchesInFlight) * kDropoutBatch <= numel) {
      batches_f32_avx512(static_cast<const float*>(x), static_cast<float*>(y), b, d);
      b += kBatchesInFlight - 1;  // and the loop's ++b
      continue;
    }
    if (avx512) batch_words_avx512<1>(d.seed, b, &words);
    else batch_words_scalar(d.seed, b, words);
#else
    batch_words_scalar(d.seed, b, words);
#endif
    const int64_t start = b * kDropoutBatch;
    const int n = int(std::min<int64_t>(kDropoutBatch, numel - start));
    for (int j = 0; j < n; ++j) dropout_element(x, y, start + j, T, d, words[j]);  // T is constant: no switch
  }
}

}  // namespace

void dropout_batches(const void* x, void* y, int64_t numel, DropoutDtype dtype, const DropoutParams& d,
                     int64_t batch_begin, int64_t batch_end) {
  switch (dtype) {
    case DropoutDtype::F32: return dropout_range<DropoutDtype::F32>(x, y, numel, d, batch_begin, batch_end);
    case DropoutDtype::F64: return dropout_range<DropoutDtype::F64>(x, y, numel, d, batch_begin, batch_end);
    case DropoutDtype::F16: return dropout_range<DropoutDtype::F16>(x, y, numel, d, batch_begin, batch_end);
    case DropoutDtype::BF16: return dropout_range<DropoutDtype::BF16>(x, y, numel, d, batch_begin, batch_end);
  }
}

}  // namespace qlora::cpu
