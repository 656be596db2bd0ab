// Decode-sized 4-bit GEMM on the CPU (see linear_4bit_cpu.h): per weight row, 16 bytes of codes become 32
// weights by two 16-entry vpermps lookups in the block's scaled table (the code table times the block's absmax,
// rounded to x's dtype: dequantize's values), then multiplied into up to eight rows of x by FMAs. AVX-512 only:
// elsewhere the caller keeps dequantize + GEMM.
#include "linear_4bit_cpu.h"

#include "quantize_cpu.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define QLORA_X86 1
#endif

namespace qlora::cpu {

void split_even_odd(const float* x, int64_t m, int64_t k, float* x_even, float* x_odd) {
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t i = 0; i < k / 2; ++i) {
      x_even[r * (k / 2) + i] = x[r * k + 2 * i];
      x_odd[r * (k / 2) + i] = x[r * k + 2 * i + 1];
    }
  }
}

#if QLORA_X86
namespace {

// The decoded weights as the dequantize op gives them in x's dtype (each value rounded once to it), back in float32.
template <FloatFormat F>
__attribute__((target("avx512f,avx512bw"))) inline __m512 round_to(__m512 w) {
  constexpr __mmask16 kAll = 0xFFFF;
  if constexpr (F == FloatFormat::BF16) {  // as f32_to_bf16_rn: nearest even, NaN (a corrupted absmax) quiet NaN
    const __m512i bits = _mm512_castps_si512(w);
    const __m512i lsb = _mm512_and_si512(_mm512_maskz_srli_epi32(kAll, bits, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    const __m512i quiet_nan = _mm512_or_si512(bits, _mm512_set1_epi32(0x00400000));
    const __m512i r = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(w, w, _CMP_UNORD_Q), quiet_nan);
    return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(int(0xFFFF0000u))));
  } else if constexpr (F == FloatFormat::F16) {
    return _mm512_maskz_cvtph_ps(kAll, _mm512_maskz_cvtps_ph(kAll, w, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    return w;
  }
}

// M rows of x against weight rows [row_begin, row_end): each weight is table[code] * absmax rounded to F, as
// dequantize computes it, and the products are summed in float32, as a GEMM on the dequantized weight does. Per
// block the 16 possible weights are computed once (the table scaled by the block's absmax, rounded to F), so a
// weight costs one lookup in that scaled table. (The all-ones-mask intrinsics compute what the plain ones do; GCC
// 12 flags the plain ones with false -Wmaybe-uninitialized warnings.)
template <int M, FloatFormat F>
__attribute__((target("avx512f,avx512bw"))) void rows_avx512(const float* x_even, const float* x_odd, int64_t k,
                                                             const uint8_t* codes, const AbsmaxSource& absmax,
                                                             int blocksize, const CodeBook& cb, const float* bias,
                                                             float* y, int64_t n_rows, int64_t row_begin,
                                                             int64_t row_end) {
  // C independent sums per row of x, so that few rows still keep several FMAs in flight (one chain would wait
  // an FMA's latency per 16 weights); G groups of 16 code bytes per step feed them.
  constexpr int C = M <= 2 ? 4 : (M <= 4 ? 2 : 1);
  constexpr int G = C == 4 ? 2 : 1;
  constexpr __mmask16 kAll = 0xFFFF;
  const __m512 table = _mm512_loadu_ps(cb.value);
  const __m128i low_nibbles = _mm_set1_epi8(0x0F);
  // k / 2 and blocksize / 2 are multiples of 32 (blocksize 64, 128 or 256): every step's loads are inside its block
  const int64_t half_k = k / 2, blocks_per_row = k / blocksize;
  for (int64_t n = row_begin; n < row_end; ++n) {
    const uint8_t* row_codes = codes + n * half_k;
    __m512 acc[M][C];
    for (int r = 0; r < M; ++r) {
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
    }
    for (int64_t b = 0; b < blocks_per_row; ++b) {
      const __m512 amax = _mm512_set1_ps(decoded_absmax(absmax, n * blocks_per_row + b));
      const __m512 values = round_to<F>(_mm512_mul_ps(table, amax));
      for (int64_t j = b * blocksize / 2; j < (b + 1) * blocksize / 2; j += 16 * G) {
        for (int g = 0; g < G; ++g) {
          const int64_t at = j + 16 * g;
          const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row_codes + at));
          const __m512i hi = _mm512_maskz_cvtepu8_epi32(kAll, _mm_and_si128(_mm_srli_epi16(bytes, 4), low_nibbles));
          const __m512i lo = _mm512_maskz_cvtepu8_epi32(kAll, _mm_and_si128(bytes, low_nibbles));
          const __m512 w_even = _mm512_maskz_permutexvar_ps(kAll, hi, values);  // elements 2at, 2at + 2, ...
          const __m512 w_odd = _mm512_maskz_permutexvar_ps(kAll, lo, values);   // elements 2at + 1, 2at + 3, ...
          for (int r = 0; r < M; ++r) {
            __m512& even_sum = acc[r][(2 * g) % C];
            __m512& odd_sum = acc[r][(2 * g + 1) % C];
            even_sum = _mm512_fmadd_ps(w_even, _mm512_loadu_ps(x_even + r * half_k + at), even_sum);
            odd_sum = _mm512_fmadd_ps(w_odd, _mm512_loadu_ps(x_odd + r * half_k + at), odd_sum);
          }
        }
      }
    }
    for (int r = 0; r < M; ++r) {  // (through memory: _mm512_reduce_add_ps draws GCC 12's false warnings too)
      __m512 total = acc[r][0];
      for (int c = 1; c < C; ++c) total = _mm512_add_ps(total, acc[r][c]);
      float lanes[16];
      _mm512_storeu_ps(lanes, total);
      float sum = 0.0f;
      for (int i = 0; i < 16; ++i) sum += lanes[i];
      y[r * n_rows + n] = sum + (bias ? bias[n] : 0.0f);
    }
  }
}

using RowsKernel = void (*)(const float*, const float*, int64_t, const uint8_t*, const AbsmaxSource&, int,
                            const CodeBook&, const float*, float*, int64_t, int64_t, int64_t);

template <FloatFormat F>
constexpr RowsKernel kRowsByM[kSmallMRows] = {rows_avx512<1, F>, rows_avx512<2, F>, rows_avx512<3, F>,
                                              rows_avx512<4, F>, rows_avx512<5, F>, rows_avx512<6, F>,
                                              rows_avx512<7, F>, rows_avx512<8, F>};

}  // namespace

// avx512_enabled() is true only on an AVX-512F/BW CPU with the switch on.
bool linear_4bit_small_m_available() { return avx512_enabled(); }

void linear_4bit_small_m_rows(const float* x_even, const float* x_odd, int64_t m, int64_t k, FloatFormat weight_format,
                              const uint8_t* codes, const AbsmaxSource& absmax, int blocksize, const CodeBook& cb,
                              const float* bias, float* y, int64_t n_rows, int64_t row_begin, int64_t row_end) {
  const RowsKernel kernel = weight_format == FloatFormat::BF16  ? kRowsByM<FloatFormat::BF16>[m - 1]
                            : weight_format == FloatFormat::F16 ? kRowsByM<FloatFormat::F16>[m - 1]
                                                                : kRowsByM<FloatFormat::F32>[m - 1];
  kernel(x_even, x_odd, k, codes, absmax, blocksize, cb, bias, y, n_rows, row_begin, row_end);
}
#else
bool linear_4bit_small_m_available() { return false; }

// Never called: linear_4bit_small_m_available() is false without x86, and the caller checks it.
void linear_4bit_small_m_rows(const float*, const float*, int64_t, int64_t, FloatFormat, const uint8_t*,
                              const AbsmaxSource&, int, const CodeBook&, const float*, float*, int64_t, int64_t,
                              int64_t) {}
#endif

}  // namespace qlora::cpu
