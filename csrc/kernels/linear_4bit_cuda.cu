// Fused 4-bit GEMMs for small M (M <= 64), forward y = x W^T and input gradient dx = dy W, on bf16/fp16
// tensor cores (mma.sync m16n8k16, sm_80+).
//
// Register-direct design: no shared-memory staging of W. Each warp loads packed codes straight from
// global memory, decodes them (table[code] * absmax, rounded once to bf16/fp16: the numbers dequantize
// produces) into B fragments and issues mma. This works because a GEMM may sum over k in any order: we
// choose which k each fragment slot holds so that every thread's codes are contiguous bytes.
//
// Forward (reduction over k): per quant block of 64 k, thread (g = lane/4, t = lane%4) owns k offsets
// 16t .. 16t+15, i.e. 8 contiguous code bytes of weight row g. Mma step j (0..3) puts k = 16t+4j+{0,1}
// in fragment slots 2t,2t+1 and k = 16t+4j+{2,3} in slots 2t+8,2t+9 -- in both A (x) and B (W).
// Input gradient (reduction over n): thread g owns output columns 8g..8g+7 of a 64-wide column block,
// i.e. 4 contiguous code bytes of each of its 4 weight rows (2t, 2t+1, 2t+8, 2t+9 of a 16-row step);
// mma n-subtile s holds columns 8g+s.
// Small M leaves too few output tiles to fill the GPU, so the reduction is split (linear_4bit_split.h):
// among the warps of a CTA (added in shared memory, one launch) and, where that is not enough, over blockIdx.y
// into fp32 partial sums that a second kernel adds. Both add in a fixed order: deterministic, unlike atomics.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda_utils.h"
#include "linear_4bit_cuda.h"
#include "linear_4bit_split.h"
#include "occupancy.h"
#include "tensor_core_utils.cuh"

namespace qlora::cuda {
namespace {

using split::Split;

constexpr int kForwardRowsPerWarp = 32;  // NT = 4 n-subtiles of 8
constexpr int kForwardNT = kForwardRowsPerWarp / 8;
constexpr int kGradNT = 8;               // 64 output columns per warp: 8 n-subtiles of 8

// Threads of a CTA at most (the launch bound, which caps registers at 65536 / threads): 16 warps for the
// one-m-tile kernels, whose in-CTA split goes to 16, else 4.
template <int MT>
constexpr int max_threads() { return split::max_warp_split(MT) * 32; }

// The warp's place in its CTA: which of the CTA's tiles it works on and which slice of that tile's range.
struct WarpRole {
  int tile;   // tile of the CTA, 0 .. tiles_per_cta - 1
  int slice;  // 0 .. warp_split - 1; slice 0 stores the result
};

__device__ __forceinline__ WarpRole warp_role(int warp_split) {
  const int warp = threadIdx.x / 32;
  return {warp / warp_split, warp % warp_split};
}

// Adds the accumulators of a tile's warp_split warps into slice 0's, pairwise (slice s + half into s, half =
// warp_split / 2, ..., 1): a fixed order, so the result does not depend on timing. Every thread of the CTA
// calls it (it holds barriers); buf: the dynamic shared memory, tiles_per_cta * warp_split / 2 parking
// places of A * B * C floats per lane (split::reduce_smem_bytes).
template <int A, int B, int C>
__device__ __forceinline__ void reduce_across_warps(float (&acc)[A][B][C], float* buf, int warp_split,
                                                    const WarpRole& role, int lane) {
  constexpr int F = A * B * C;
  for (int half = warp_split / 2; half >= 1; half /= 2) {
    if (role.slice >= half && role.slice < 2 * half) {
      float* dst = buf + (int64_t(role.tile) * (warp_split / 2) + (role.slice - half)) * F * 32 + lane;
#pragma unroll
      for (int a = 0; a < A; ++a)
#pragma unroll
        for (int b = 0; b < B; ++b)
#pragma unroll
          for (int c = 0; c < C; ++c) dst[((a * B + b) * C + c) * 32] = acc[a][b][c];
    }
    __syncthreads();
    if (role.slice < half) {
      const float* src = buf + (int64_t(role.tile) * (warp_split / 2) + role.slice) * F * 32 + lane;
#pragma unroll
      for (int a = 0; a < A; ++a)
#pragma unroll
        for (int b = 0; b < B; ++b)
#pragma unroll
          for (int c = 0; c < C; ++c) acc[a][b][c] += src[((a * B + b) * C + c) * 32];
    }
    __syncthreads();
  }
}

__device__ __forceinline__ float block_absmax(const AbsmaxSource& am, float mean, int64_t block) {
  return am.f32 ? am.f32[block] : decode_absmax(am.fp8[block], am.chunk_scale[block / kAbsmaxChunk], mean);
}


// ---- forward --------------------------------------------------------------------------------------
// Quant block b of the warp's weight rows n_base + 8 nt + g: this thread's 8 code bytes (k offsets 16t .. 16t+15)
// and the block's absmax; rows past N read as zero.
template <int NT>
__device__ __forceinline__ void load_forward_weights(const uint8_t* __restrict__ codes, const AbsmaxSource& am,
                                                     float mean, int64_t N, int64_t K, int64_t n_base, int g, int t,
                                                     int64_t b, uint2 (&wc)[NT], float (&wam)[NT]) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int64_t row = n_base + nt * 8 + g;
    if (row < N) {
      wc[nt] = *reinterpret_cast<const uint2*>(codes + row * (K / 2) + b * 32 + 8 * t);
      wam[nt] = block_absmax(am, mean, row * (K / 64) + b);
    } else {
      wc[nt] = make_uint2(0, 0);
      wam[nt] = 0.0f;
    }
  }
}

template <bool BF16, int MT>
__global__ void __launch_bounds__(max_threads<MT>()) fused_forward_kernel(
    const uint16_t* __restrict__ x, const uint8_t* __restrict__ codes, AbsmaxSource am, CodeBook cb, int64_t M,
    int64_t N, int64_t K, int64_t blocks_per_split, int warp_split, float* __restrict__ partial,
    const uint16_t* __restrict__ bias, uint16_t* __restrict__ y) {
  constexpr int NT = kForwardNT;
  extern __shared__ float reduce_buf[];
  __shared__ float table[16];
  if (threadIdx.x < 16) table[threadIdx.x] = cb.value[threadIdx.x];
  __syncthreads();
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const WarpRole role = warp_role(warp_split);
  const int tiles_per_cta = int(blockDim.x / 32) / warp_split;
  const int64_t n_base = (int64_t(blockIdx.x) * tiles_per_cta + role.tile) * kForwardRowsPerWarp;
  // A warp past the last row computes nothing but stays for the CTA's barriers.
  const bool active = n_base < N;
  const int64_t kblocks = K / 64;
  const int64_t split_begin = int64_t(blockIdx.y) * blocks_per_split;
  const int64_t split_end = split_begin + blocks_per_split < kblocks ? split_begin + blocks_per_split : kblocks;
  int64_t b_begin = 0, b_end = 0;
  if (active) split::warp_slice(split_begin, split_end, warp_split, role.slice, b_begin, b_end);
  const float mean = am.f32 ? 0.0f : *am.mean;

  float acc[MT][NT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.0f;

  // The weight stream is what bounds this kernel: block b + 1's codes and absmax are requested before block
  // b's mma (registers, one block ahead), so each warp keeps two blocks of weight bytes in flight.
  uint2 wc[NT];
  float wam[NT];
  if (b_begin < b_end) load_forward_weights<NT>(codes, am, mean, N, K, n_base, g, t, b_begin, wc, wam);
  for (int64_t b = b_begin; b < b_end; ++b) {
    uint2 wc_next[NT];
    float wam_next[NT];
    // the last block reloads itself (an L1 hit) rather than branch around the prefetch
    load_forward_weights<NT>(codes, am, mean, N, K, n_base, g, t, b + 1 < b_end ? b + 1 : b, wc_next, wam_next);
    uint4 xa[MT][2][2];  // [m tile][row g, row g+8][k offsets 16t..16t+7, 16t+8..16t+15]
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t m = mt * 16 + g + 8 * h;
        if (m < M) {
          const uint4* p = reinterpret_cast<const uint4*>(x + m * K + b * 64 + 16 * t);
          xa[mt][h][0] = p[0];
          xa[mt][h][1] = p[1];
        } else {
          xa[mt][h][0] = xa[mt][h][1] = make_uint4(0, 0, 0, 0);
        }
      }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      uint32_t b0[NT], b1[NT];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const uint32_t w = j < 2 ? wc[nt].x : wc[nt].y;
        const uint32_t byte0 = (w >> (16 * (j & 1))) & 0xFFu, byte1 = (w >> (16 * (j & 1) + 8)) & 0xFFu;
        b0[nt] = pack2<BF16>(mul_rn(table[byte0 >> 4], wam[nt]), mul_rn(table[byte0 & 0xFu], wam[nt]));
        b1[nt] = pack2<BF16>(mul_rn(table[byte1 >> 4], wam[nt]), mul_rn(table[byte1 & 0xFu], wam[nt]));
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        // words 2j and 2j+1 of a row's 8 words hold k offsets 4j..4j+1 and 4j+2..4j+3
        const uint4& r0 = xa[mt][0][j / 2];
        const uint4& r1 = xa[mt][1][j / 2];
        const uint32_t a0 = word_of(r0, 2 * (j % 2)), a2 = word_of(r0, 2 * (j % 2) + 1);
        const uint32_t a1 = word_of(r1, 2 * (j % 2)), a3 = word_of(r1, 2 * (j % 2) + 1);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) mma_16816<BF16>(acc[mt][nt], a0, a1, a2, a3, b0[nt], b1[nt]);
      }
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) wc[nt] = wc_next[nt], wam[nt] = wam_next[nt];
  }

  if (warp_split > 1) reduce_across_warps(acc, reduce_buf, warp_split, role, lane);
  if (!active || role.slice != 0) return;
  const bool direct = gridDim.y == 1;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t m = mt * 16 + g + 8 * (i / 2);
        const int64_t n = n_base + nt * 8 + 2 * t + (i % 2);
        if (m >= M || n >= N) continue;
        if (direct) {
          const float v = bias ? acc[mt][nt][i] + act_to_f32<BF16>(bias[n]) : acc[mt][nt][i];
          y[m * N + n] = f32_to_act<BF16>(v);
        } else {
          partial[(int64_t(blockIdx.y) * M + m) * N + n] = acc[mt][nt][i];
        }
      }
}

// ---- input gradient ---------------------------------------------------------------------------------
// Rows n0 + {2t, 2t+1, 2t+8, 2t+9} of the 16-row step at n0, column block bk: this thread's 4 code bytes
// (columns 8g .. 8g+7) of each and their absmax; rows past row_end read as zero.
__device__ __forceinline__ void load_grad_weights(const uint8_t* __restrict__ codes, const AbsmaxSource& am,
                                                  float mean, int64_t K, int64_t row_end, int64_t bk, int g, int t,
                                                  int64_t n0, uint32_t (&wc)[4], float (&wam)[4]) {
  const int row_offset[4] = {2 * t, 2 * t + 1, 2 * t + 8, 2 * t + 9};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t row = n0 + row_offset[i];
    if (row < row_end) {
      wc[i] = *reinterpret_cast<const uint32_t*>(codes + row * (K / 2) + bk * 32 + 4 * g);
      wam[i] = block_absmax(am, mean, row * (K / 64) + bk);
    } else {
      wc[i] = 0;
      wam[i] = 0.0f;
    }
  }
}

template <bool BF16, int MT>
__global__ void __launch_bounds__(max_threads<MT>()) fused_grad_input_kernel(
    const uint16_t* __restrict__ dy, const uint8_t* __restrict__ codes, AbsmaxSource am, CodeBook cb, int64_t M,
    int64_t N, int64_t K, int64_t rows_per_split, int warp_split, float* __restrict__ partial,
    uint16_t* __restrict__ dx) {
  extern __shared__ float reduce_buf[];
  __shared__ float table[16];
  if (threadIdx.x < 16) table[threadIdx.x] = cb.value[threadIdx.x];
  __syncthreads();
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const WarpRole role = warp_role(warp_split);
  const int tiles_per_cta = int(blockDim.x / 32) / warp_split;
  const int64_t kblocks = K / 64;
  const int64_t bk = int64_t(blockIdx.x) * tiles_per_cta + role.tile;  // 64-wide column block of dx (quant block)
  // A warp past the last column block computes nothing but stays for the CTA's barriers.
  const bool active = bk < kblocks;
  const int64_t split_begin = int64_t(blockIdx.y) * rows_per_split;
  const int64_t split_end = split_begin + rows_per_split < N ? split_begin + rows_per_split : N;
  // the warp's slice in 16-row steps (rows_per_split is a multiple of 16)
  int64_t step_begin = 0, step_end = 0;
  if (active) split::warp_slice(0, (split_end - split_begin + 15) / 16, warp_split, role.slice, step_begin, step_end);
  const int64_t row_begin = split_begin + 16 * step_begin;
  const int64_t row_end = split_begin + 16 * step_end < split_end ? split_begin + 16 * step_end : split_end;
  const float mean = am.f32 ? 0.0f : *am.mean;

  float acc[MT][kGradNT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int s = 0; s < kGradNT; ++s)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][s][i] = 0.0f;

  // As in the forward kernel, the next 16 rows' codes and absmax are requested before this step's mma.
  uint32_t wc[4];
  float wam[4];
  if (row_begin < row_end) load_grad_weights(codes, am, mean, K, row_end, bk, g, t, row_begin, wc, wam);
  for (int64_t n0 = row_begin; n0 < row_end; n0 += 16) {
    uint32_t wc_next[4];
    float wam_next[4];
    load_grad_weights(codes, am, mean, K, row_end, bk, g, t, n0 + 16 < row_end ? n0 + 16 : n0, wc_next, wam_next);
    uint32_t a[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int q = 0; q < 4; ++q) {  // a0: (row g, n 2t..2t+1), a1: (row g+8, ...), a2/a3: n 2t+8..2t+9
        const int64_t m = mt * 16 + g + 8 * (q & 1);
        const int64_t n = n0 + 2 * t + 8 * (q >> 1);
        const uint16_t lo = (m < M && n < row_end) ? dy[m * N + n] : uint16_t(0);
        const uint16_t hi = (m < M && n + 1 < row_end) ? dy[m * N + n + 1] : uint16_t(0);
        a[mt][q] = uint32_t(lo) | (uint32_t(hi) << 16);
      }
#pragma unroll
    for (int s = 0; s < kGradNT; ++s) {
      float v[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const uint32_t byte = (wc[i] >> (8 * (s / 2))) & 0xFFu;
        v[i] = mul_rn(table[(s & 1) ? (byte & 0xFu) : (byte >> 4)], wam[i]);
      }
      const uint32_t b0 = pack2<BF16>(v[0], v[1]), b1 = pack2<BF16>(v[2], v[3]);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) mma_16816<BF16>(acc[mt][s], a[mt][0], a[mt][1], a[mt][2], a[mt][3], b0, b1);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) wc[i] = wc_next[i], wam[i] = wam_next[i];
  }

  if (warp_split > 1) reduce_across_warps(acc, reduce_buf, warp_split, role, lane);
  if (!active || role.slice != 0) return;
  const bool direct = gridDim.y == 1;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int s = 0; s < kGradNT; ++s)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t m = mt * 16 + g + 8 * (i / 2);
        const int64_t k = bk * 64 + 8 * (2 * t + (i % 2)) + s;
        if (m >= M) continue;
        if (direct) {
          dx[m * K + k] = f32_to_act<BF16>(acc[mt][s][i]);
        } else {
          partial[(int64_t(blockIdx.y) * M + m) * K + k] = acc[mt][s][i];
        }
      }
}

// Sums the split partials in order s = 0, 1, ... (deterministic), adds the bias, rounds once.
template <bool BF16>
__global__ void reduce_partials_kernel(const float* __restrict__ partial, int splits, int64_t rows, int64_t cols,
                                       const uint16_t* __restrict__ bias, uint16_t* __restrict__ out) {
  const int64_t total = rows * cols;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    float v = 0.0f;
    for (int s = 0; s < splits; ++s) v += partial[s * total + i];
    if (bias) v += act_to_f32<BF16>(bias[i % cols]);
    out[i] = f32_to_act<BF16>(v);
  }
}

// The kernel instance for M rows (16, 32 or 64 per CTA: MT tensor-core tiles).
template <bool BF16>
auto forward_kernel(int64_t m) {
  return m <= 16 ? fused_forward_kernel<BF16, 1>
                 : m <= 32 ? fused_forward_kernel<BF16, 2> : fused_forward_kernel<BF16, 4>;
}
template <bool BF16>
auto grad_input_kernel(int64_t m) {
  return m <= 16 ? fused_grad_input_kernel<BF16, 1>
                 : m <= 32 ? fused_grad_input_kernel<BF16, 2> : fused_grad_input_kernel<BF16, 4>;
}
int m_tiles(int64_t m) { return m <= 16 ? 1 : m <= 32 ? 2 : 4; }

// fp32 accumulators per lane (the in-CTA reduction parks them in shared memory): acc[MT][NT][4].
int forward_floats_per_lane(int64_t m) { return m_tiles(m) * kForwardNT * 4; }
int grad_floats_per_lane(int64_t m) { return m_tiles(m) * kGradNT * 4; }

int64_t forward_tiles(const Linear4bitProblem& p) { return (p.n + kForwardRowsPerWarp - 1) / kForwardRowsPerWarp; }

// The split of `tiles` tiles over `units` reduction units (of `reduction` values) for `kernel`: sized first by
// the warps the GPU holds in 4-warp CTAs without shared memory; where the CTA shape that gives (8 or 16 warps,
// the reduction's shared memory) holds fewer per SM (the register file fits whole CTAs only), once more by
// those, so that the warps stay within one wave.
template <typename Kernel>
Split fit_split(Kernel kernel, int num_sms, int64_t tiles, int64_t units, int64_t reduction,
                const Linear4bitProblem& p, int floats_per_lane) {
  const void* k = reinterpret_cast<const void*>(kernel);
  const int64_t resident = int64_t(num_sms) * ctas_per_sm(k, split::kTileWarps * 32, 0) * split::kTileWarps;
  Split s = split::choose_split(tiles, units, reduction, p.m, m_tiles(p.m), resident, split::split_mode_of(p.split_mode));
  const int warps = split::cta_warps(s);
  const int64_t held =
      int64_t(num_sms) * ctas_per_sm(k, warps * 32, split::reduce_smem_bytes(s, floats_per_lane)) * warps;
  if (held < resident) s = split::choose_split(tiles, units, reduction, p.m, m_tiles(p.m), held, split::split_mode_of(p.split_mode));
  return s;
}

// Forward: tiles of 32 weight rows, reduction over K / 64 quant blocks.
Split forward_split(const Linear4bitProblem& p, int num_sms) {
  const int floats = forward_floats_per_lane(p.m);
  return p.bf16 ? fit_split(forward_kernel<true>(p.m), num_sms, forward_tiles(p), p.k / 64, p.k, p, floats)
                : fit_split(forward_kernel<false>(p.m), num_sms, forward_tiles(p), p.k / 64, p.k, p, floats);
}

// Input gradient: tiles of 64 columns (one quant block), reduction over N in 16-row steps.
Split grad_split(const Linear4bitProblem& p, int num_sms) {
  const int floats = grad_floats_per_lane(p.m);
  Split s = p.bf16 ? fit_split(grad_input_kernel<true>(p.m), num_sms, p.k / 64, (p.n + 15) / 16, p.n, p, floats)
                   : fit_split(grad_input_kernel<false>(p.m), num_sms, p.k / 64, (p.n + 15) / 16, p.n, p, floats);
  s.per_split *= 16;  // in rows
  return s;
}

template <bool BF16>
cudaError_t launch_forward(const Linear4bitProblem& p, const void* x, const void* bias, void* y, float* ws,
                           int num_sms, cudaStream_t stream) {
  const Split sp = forward_split(p, num_sms);
  if (sp.splits > 1 && ws == nullptr) return cudaErrorInvalidValue;  // the workspace size was not asked
  const dim3 grid(unsigned((forward_tiles(p) + sp.tiles_per_cta - 1) / sp.tiles_per_cta), unsigned(sp.splits));
  const int smem = split::reduce_smem_bytes(sp, forward_floats_per_lane(p.m));
  const auto* bs = static_cast<const uint16_t*>(bias);
  auto* ys = static_cast<uint16_t*>(y);
  forward_kernel<BF16>(p.m)<<<grid, split::cta_warps(sp) * 32, smem, stream>>>(
      static_cast<const uint16_t*>(x), p.codes, p.absmax, p.codebook, p.m, p.n, p.k, sp.per_split, sp.warp_split,
      ws, bs, ys);
  QLORA_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  if (sp.splits > 1) return reduce_split_partials(ws, sp.splits, p.m, p.n, bias, y, BF16, stream);
  return cudaSuccess;
}

template <bool BF16>
cudaError_t launch_grad_input(const Linear4bitProblem& p, const void* dy, void* dx, float* ws, int num_sms,
                              cudaStream_t stream) {
  const Split sp = grad_split(p, num_sms);
  if (sp.splits > 1 && ws == nullptr) return cudaErrorInvalidValue;  // the workspace size was not asked
  const dim3 grid(unsigned((p.k / 64 + sp.tiles_per_cta - 1) / sp.tiles_per_cta), unsigned(sp.splits));
  const int smem = split::reduce_smem_bytes(sp, grad_floats_per_lane(p.m));
  auto* xs = static_cast<uint16_t*>(dx);
  grad_input_kernel<BF16>(p.m)<<<grid, split::cta_warps(sp) * 32, smem, stream>>>(
      static_cast<const uint16_t*>(dy), p.codes, p.absmax, p.codebook, p.m, p.n, p.k, sp.per_split, sp.warp_split,
      ws, xs);
  QLORA_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  if (sp.splits > 1) return reduce_split_partials(ws, sp.splits, p.m, p.k, nullptr, dx, BF16, stream);
  return cudaSuccess;
}

bool valid(const Linear4bitProblem& p) {
  return p.blocksize == 64 && p.k % 64 == 0 && p.m >= 1 && p.m <= kFusedMaxM && p.n >= 1;
}

}  // namespace

cudaError_t reduce_split_partials(const float* partial, int64_t splits, int64_t rows, int64_t cols, const void* bias,
                                  void* out, bool bf16, cudaStream_t stream) {
  const auto* b = static_cast<const uint16_t*>(bias);
  auto* o = static_cast<uint16_t*>(out);
  const unsigned blocks = grid_for(rows * cols, 256);
  if (bf16) {
    reduce_partials_kernel<true><<<blocks, 256, 0, stream>>>(partial, int(splits), rows, cols, b, o);
  } else {
    reduce_partials_kernel<false><<<blocks, 256, 0, stream>>>(partial, int(splits), rows, cols, b, o);
  }
  return cudaGetLastError();
}

int64_t fused_forward_workspace_bytes(const Linear4bitProblem& p, int num_sms) {
  const Split s = forward_split(p, num_sms);
  return s.splits > 1 ? s.splits * p.m * p.n * int64_t(sizeof(float)) : 0;
}

int64_t fused_grad_input_workspace_bytes(const Linear4bitProblem& p, int num_sms) {
  const Split s = grad_split(p, num_sms);
  return s.splits > 1 ? s.splits * p.m * p.k * int64_t(sizeof(float)) : 0;
}

cudaError_t fused_linear_forward(const Linear4bitProblem& p, const void* x, const void* bias, void* y,
                                 float* workspace, int num_sms, cudaStream_t stream) {
  QLORA_NVTX_RANGE_FN();
  if (!valid(p)) return cudaErrorInvalidValue;
  return p.bf16 ? launch_forward<true>(p, x, bias, y, workspace, num_sms, stream)
                : launch_forward<false>(p, x, bias, y, workspace, num_sms, stream);
}

cudaError_t fused_linear_grad_input(const Linear4bitProblem& p, const void* dy, void* dx, float* workspace,
                                    int num_sms, cudaStream_t stream) {
  QLORA_NVTX_RANGE_FN();
  if (!valid(p)) return cudaErrorInvalidValue;
  return p.bf16 ? launch_grad_input<true>(p, dy, dx, workspace, num_sms, stream)
                : launch_grad_input<false>(p, dy, dx, workspace, num_sms, stream);
}

}  // namespace qlora::cuda
