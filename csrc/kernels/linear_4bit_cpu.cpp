// Decode-sized 4-bit GEMM on the CPU (see linear_4bit_cpu.h): per weight row, 16 bytes of codes become 32
// weights by two 16-entry vpermps lookups in the block's scaled table (the code table times the block's absmax,
// rounded to x's dtype: dequantize's values), then multiplied into up to eight rows of x by FMAs. AVX-512 only:
// elsewhere the caller keeps dequantize + GEMM.
//
// Decoding order. The 16 code bytes are broadcast to all four 128-bit lanes (a load, no shuffle) and lane L is
// shifted right by 8 * (L / 4) bits, or 4 more: its low nibble is then the low (odd element) or high (even
// element) nibble of code byte 4 * (L % 4) + L / 4, and vpermps reads only the low four bits of an index. So a
// shift per 16 weights replaces a byte-to-dword widening, which competes with the lookups for the one shuffle
// port; x is put once per call in the order the weights come out in (order_x_for_lookup).
#include "linear_4bit_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "quantize_cpu.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define QLORA_X86 1
#endif


#define QLORA_PF 8192
namespace qlora::cpu {
namespace {

constexpr int kGroupBytes = 16;                   // code bytes decoded per step
constexpr int kGroupElements = 2 * kGroupBytes;   // 32 weights

// How far ahead of the codes being decoded to prefetch (the next row, about): the hardware prefetcher alone left
// the kernel waiting on memory when W is not in the cache (as in generation, where every layer's weight is read
// once per token): 4096 x 4096 at one row took 1.5 ms with a cold cache against 0.7 ms with a warm one, and 1.05
// ms with this prefetch (distances 512-8192 tried; 2048 was best).
constexpr int64_t kPrefetchBytes = 2048;

// Lane L of a group's even (high-nibble) half: code byte 4 * (L % 4) + L / 4.
constexpr int group_byte(int lane) { return 4 * (lane % 4) + lane / 4; }

}  // namespace

void order_x_for_lookup(const float* x, int64_t m, int64_t k, float* x_lookup) {
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t g = 0; g < k; g += kGroupElements) {
      const float* src = x + r * k + g;
      float* dst = x_lookup + r * k + g;
      for (int lane = 0; lane < 16; ++lane) {
        dst[lane] = src[2 * group_byte(lane)];           // high nibble: the even element
        dst[16 + lane] = src[2 * group_byte(lane) + 1];  // low nibble: the odd element
      }
    }
  }
}

#if QLORA_X86
namespace {

// The decoded weights as the dequantize op gives them in x's dtype (each value rounded once to it), back in float32.
// may_be_nan: whether w can hold NaN (a non-finite absmax, i.e. a corrupted state); the bfloat16 rounding then
// keeps NaN quiet NaN as f32_to_bf16_rn does, which costs three more instructions per block.
template <FloatFormat F>
__attribute__((target("avx512f,avx512bw"))) inline __m512 round_to(__m512 w, bool may_be_nan) {
  constexpr __mmask16 kAll = 0xFFFF;
  if constexpr (F == FloatFormat::BF16) {  // as f32_to_bf16_rn: nearest even (finite values never round to NaN)
    const __m512i bits = _mm512_castps_si512(w);
    const __m512i lsb = _mm512_and_si512(_mm512_maskz_srli_epi32(kAll, bits, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    if (may_be_nan) {
      const __m512i quiet_nan = _mm512_or_si512(bits, _mm512_set1_epi32(0x00400000));
      r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(w, w, _CMP_UNORD_Q), quiet_nan);
    }
    return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(int(0xFFFF0000u))));
  } else if constexpr (F == FloatFormat::F16) {
    return _mm512_maskz_cvtph_ps(kAll, _mm512_maskz_cvtps_ph(kAll, w, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    return w;
  }
}

// The first-level absmax of blocks [first, first + count) (count <= 16) decoded from their FP8 double quantization
// into out[0, count), 16 at a time: decode_absmax's arithmetic (fp8_e4m3_decode, then times the chunk's scale plus
// the mean, rounded after each, negative and NaN to zero), lane by lane.
__attribute__((target("avx512f,avx512bw"))) void decode_absmax16(const AbsmaxSource& a, int64_t first, int count,
                                                                 float* out) {
  constexpr __mmask16 kAll = 0xFFFF;
  uint8_t tail[16] = {};
  const uint8_t* src = a.fp8 + first;
  if (count < 16) {
    std::memcpy(tail, src, size_t(count));
    src = tail;
  }
  const __m512i c = _mm512_maskz_cvtepu8_epi32(kAll, _mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  const __m512i sign = _mm512_maskz_slli_epi32(kAll, _mm512_and_si512(c, _mm512_set1_epi32(0x80)), 24);
  const __m512i e = _mm512_and_si512(_mm512_maskz_srli_epi32(kAll, c, 3), _mm512_set1_epi32(0xF));
  const __m512i m = _mm512_and_si512(c, _mm512_set1_epi32(7));
  const __m512i normal = _mm512_or_si512(
      sign, _mm512_or_si512(_mm512_maskz_slli_epi32(kAll, _mm512_add_epi32(e, _mm512_set1_epi32(120)), 23),
                            _mm512_maskz_slli_epi32(kAll, m, 20)));
  const __m512i subnormal = _mm512_or_si512(  // float(m) * 2^-9 is exact
      sign, _mm512_castps_si512(_mm512_mul_ps(_mm512_maskz_cvtepi32_ps(kAll, m), _mm512_set1_ps(0x1p-9f))));
  const __m512i nan = _mm512_or_si512(sign, _mm512_set1_epi32(0x7FC00000));
  __m512i bits = _mm512_mask_mov_epi32(normal, _mm512_cmpeq_epi32_mask(e, _mm512_setzero_si512()), subnormal);
  bits = _mm512_mask_mov_epi32(bits, _mm512_cmpeq_epi32_mask(_mm512_and_si512(c, _mm512_set1_epi32(0x7F)),
                                                              _mm512_set1_epi32(0x7F)), nan);
  // 16 consecutive blocks lie in at most two chunks of kAbsmaxChunk (256) blocks
  const int64_t chunk = first / kAbsmaxChunk, last_chunk = (first + count - 1) / kAbsmaxChunk;
  __m512 scale = _mm512_set1_ps(a.chunk_scale[chunk]);
  if (last_chunk != chunk) {
    const int from_lane = int(last_chunk * kAbsmaxChunk - first);
    scale = _mm512_mask_mov_ps(scale, __mmask16(0xFFFFu << from_lane), _mm512_set1_ps(a.chunk_scale[last_chunk]));
  }
  // separate multiply and add (no FMA: the file is built with -ffp-contract=off); max(v, 0) gives 0 for NaN v
  const __m512 v = _mm512_add_ps(_mm512_mul_ps(_mm512_castsi512_ps(bits), scale), _mm512_set1_ps(*a.mean));
  float lanes[16];
  _mm512_storeu_ps(lanes, _mm512_maskz_max_ps(kAll, v, _mm512_setzero_ps()));
  std::memcpy(out, lanes, sizeof(float) * size_t(count));
}

// M rows of x against weight rows [row_begin, row_end): each weight is table[code] * absmax rounded to F, as
// dequantize computes it, and the products are summed in float32, as a GEMM on the dequantized weight does. Per
// block the 16 possible weights are computed once (the table scaled by the block's absmax, rounded to F), so a
// weight costs one lookup in that scaled table. (The all-ones-mask intrinsics compute what the plain ones do; GCC
// 12 flags the plain ones with false -Wmaybe-uninitialized warnings.)
template <int M, FloatFormat F>
__attribute__((target("avx512f,avx512bw"))) void rows_avx512(const float* x_lookup, int64_t k, const uint8_t* codes,
                                                             const AbsmaxSource& absmax, int blocksize,
                                                             const CodeBook& cb, const float* bias, float* y,
                                                             int64_t n_rows, int64_t row_begin, int64_t row_end) {
  // C independent sums per row of x, so that few rows still keep several FMAs in flight (one chain would wait
  // an FMA's latency per 16 weights); G groups of 16 code bytes per step feed them.
  constexpr int C = M <= 2 ? 4 : (M <= 4 ? 2 : 1);
  constexpr int G = C == 4 ? 2 : 1;
  constexpr __mmask16 kAll = 0xFFFF;
  const __m512 table = _mm512_loadu_ps(cb.value);
  // lane L: 8 * (L / 4) bits to the low nibble of its code byte, 4 more to the high one (see the top of the file)
  const __m512i shift_odd = _mm512_set_epi32(24, 24, 24, 24, 16, 16, 16, 16, 8, 8, 8, 8, 0, 0, 0, 0);
  const __m512i shift_even = _mm512_add_epi32(shift_odd, _mm512_set1_epi32(4));
  // k / 2 and blocksize / 2 are multiples of 32 (blocksize 64, 128 or 256): every step's loads are inside its block
  const int64_t half_k = k / 2, blocks_per_row = k / blocksize;
  float decoded[16];  // absmax of the current 16 blocks, when double quantized
  for (int64_t n = row_begin; n < row_end; ++n) {
    const uint8_t* row_codes = codes + n * half_k;
    __m512 acc[M][C];
    for (int r = 0; r < M; ++r) {
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
    }
    for (int64_t b = 0; b < blocks_per_row; ++b) {
      const int64_t block = n * blocks_per_row + b;
      float amax;
      if (absmax.f32 != nullptr) {
        amax = absmax.f32[block];
      } else {
        if (b % 16 == 0) decode_absmax16(absmax, block, int(std::min<int64_t>(16, blocks_per_row - b)), decoded);
        amax = decoded[b % 16];
      }
      // table values lie in [-1, 1]: a finite absmax gives finite weights
      const __m512 values = round_to<F>(_mm512_mul_ps(table, _mm512_set1_ps(amax)), !std::isfinite(amax));
      for (int64_t j = b * blocksize / 2; j < (b + 1) * blocksize / 2; j += kGroupBytes * G) {
        if ((j & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(row_codes + j + kPrefetchBytes), _MM_HINT_T0);
        for (int g = 0; g < G; ++g) {
          const int64_t at = j + kGroupBytes * g;
          const __m512i bytes = _mm512_maskz_broadcast_i32x4(
              kAll, _mm_loadu_si128(reinterpret_cast<const __m128i*>(row_codes + at)));
          const __m512i even_index = _mm512_maskz_srlv_epi32(kAll, bytes, shift_even);
          const __m512i odd_index = _mm512_maskz_srlv_epi32(kAll, bytes, shift_odd);
          const __m512 w_even = _mm512_maskz_permutexvar_ps(kAll, even_index, values);
          const __m512 w_odd = _mm512_maskz_permutexvar_ps(kAll, odd_index, values);
          for (int r = 0; r < M; ++r) {
            const float* xr = x_lookup + r * k + 2 * at;  // the group's 16 even elements, then its 16 odd ones
            __m512& even_sum = acc[r][(2 * g) % C];
            __m512& odd_sum = acc[r][(2 * g + 1) % C];
            even_sum = _mm512_fmadd_ps(w_even, _mm512_loadu_ps(xr), even_sum);
            odd_sum = _mm512_fmadd_ps(w_odd, _mm512_loadu_ps(xr + 16), odd_sum);
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

using RowsKernel = void (*)(const float*, int64_t, const uint8_t*, const AbsmaxSource&, int, const CodeBook&,
                            const float*, float*, int64_t, int64_t, int64_t);

template <FloatFormat F>
constexpr RowsKernel kRowsByM[kSmallMRows] = {rows_avx512<1, F>, rows_avx512<2, F>, rows_avx512<3, F>,
                                              rows_avx512<4, F>, rows_avx512<5, F>, rows_avx512<6, F>,
                                              rows_avx512<7, F>, rows_avx512<8, F>};

}  // namespace

// avx512_enabled() is true only on an AVX-512F/BW CPU with the switch on.
bool linear_4bit_small_m_available() { return avx512_enabled(); }

void linear_4bit_small_m_rows(const float* x_lookup, int64_t m, int64_t k, FloatFormat weight_format,
                              const uint8_t* codes, const AbsmaxSource& absmax, int blocksize, const CodeBook& cb,
                              const float* bias, float* y, int64_t n_rows, int64_t row_begin, int64_t row_end) {
  const RowsKernel kernel = weight_format == FloatFormat::BF16  ? kRowsByM<FloatFormat::BF16>[m - 1]
                            : weight_format == FloatFormat::F16 ? kRowsByM<FloatFormat::F16>[m - 1]
                                                                : kRowsByM<FloatFormat::F32>[m - 1];
  kernel(x_lookup, k, codes, absmax, blocksize, cb, bias, y, n_rows, row_begin, row_end);
}
#else
bool linear_4bit_small_m_available() { return false; }

// Never called: linear_4bit_small_m_available() is false without x86, and the caller checks it.
void linear_4bit_small_m_rows(const float*, int64_t, int64_t, FloatFormat, const uint8_t*, const AbsmaxSource&, int,
                              const CodeBook&, const float*, float*, int64_t, int64_t, int64_t) {}
#endif

}  // namespace qlora::cpu
