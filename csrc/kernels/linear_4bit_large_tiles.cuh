// Pieces shared by the fused large-M 4-bit GEMMs (linear_4bit_large_cuda.cu, mma.sync, sm_80+; and
// linear_4bit_hopper_cuda.cu, wgmma, sm_90a): cp.async copies of the activation tile into its swizzled stage,
// the one-step-ahead fetch of a thread's 32 packed weights, their decode into the weight tile (table[code]
// * absmax in fp32, rounded once to bf16/fp16: the numbers dequantize produces), the epilogue's paired stores
// (output or split-K partial sums), and, on the host, the split-K plan.
// Every index formula comes from linear_4bit_large_layout.h, which the CPU tests emulate.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "linear_4bit_cuda.h"
#include "linear_4bit_large_layout.h"
#include "linear_4bit_split.h"
#include "numeric_core.h"
#include "occupancy.h"
#include "tensor_core_utils.cuh"

namespace qlora::cuda::large_tiles {

using namespace qlora::large;

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; only the first src_bytes are read, the rest of the 16 is zero-filled.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// "memory": shared-memory reads after the wait must not be moved above it.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// One activation tile (rows row0.., reduction columns col0..; ld = row stride = reduction length `cols`)
// into a swizzled stage. kVec: rows are 16-byte aligned (cols % 8 == 0, aligned base) -> cp.async with
// zero-fill; otherwise plain 2-byte loads (odd N in the input gradient).
template <bool kVec>
__device__ __forceinline__ void load_act_tile(uint16_t* stage, const uint16_t* __restrict__ act, int64_t rows,
                                              int64_t cols, int64_t row0, int64_t col0, int tid) {
  // The plain-load path copies one chunk at a time (not unrolled): its 8 loads per chunk would otherwise
  // all be in flight together and push the kernel past 128 registers.
#pragma unroll(kVec ? kActCopiesPerThread : 1)
  for (int i = 0; i < kActCopiesPerThread; ++i) {
    const int r = act_copy_row(tid, i), c = act_copy_chunk(tid, i);
    const int64_t gr = row0 + r, gc = col0 + int64_t(c) * kChunkElems;
    uint16_t* dst = stage + swizzle(r, c, kActChunksPerRow);
    const int64_t left = cols - gc;
    const int valid = gr < rows ? (left >= kChunkElems ? kChunkElems : (left > 0 ? int(left) : 0)) : 0;
    if constexpr (kVec) {
      const uint16_t* src = valid > 0 ? act + gr * cols + gc : act;  // never read when valid == 0
      cp_async_16(smem_addr(dst), src, 2 * valid);
    } else {
      uint16_t v[kChunkElems];
#pragma unroll
      for (int e = 0; e < kChunkElems; ++e) v[e] = e < valid ? act[gr * cols + gc + e] : uint16_t(0);
      uint4 packed;
      packed.x = uint32_t(v[0]) | (uint32_t(v[1]) << 16);
      packed.y = uint32_t(v[2]) | (uint32_t(v[3]) << 16);
      packed.z = uint32_t(v[4]) | (uint32_t(v[5]) << 16);
      packed.w = uint32_t(v[6]) | (uint32_t(v[7]) << 16);
      *reinterpret_cast<uint4*>(dst) = packed;
    }
  }
}

// A thread's 32 weights of the next step, fetched one step ahead: raw codes and the raw absmax pieces, so the
// loads' latency hides behind a step of mma (decoding happens when the step comes).
struct WeightFetch {
  uint4 codes = make_uint4(0, 0, 0, 0);
  float absmax_or_scale = 0.0f;  // fp32 absmax, or the FP8 chunk scale
  uint32_t fp8 = 0;
  bool valid = false;
};

__device__ __forceinline__ WeightFetch fetch_weights(const uint8_t* __restrict__ codes, const AbsmaxSource& am,
                                                     uint32_t n, uint32_t k, uint32_t N, uint32_t K) {
  WeightFetch f;
  if (n < N && k < K) {
    f.codes = *reinterpret_cast<const uint4*>(codes + code_byte<uint32_t>(n, k, K));
    const uint32_t block = absmax_block<uint32_t>(n, k, K);
    if (am.f32) {
      f.absmax_or_scale = am.f32[block];
    } else {
      f.fp8 = am.fp8[block];
      f.absmax_or_scale = am.chunk_scale[block / kAbsmaxChunk];
    }
    f.valid = true;
  }
  return f;
}

// Decodes a fetch into its 4 chunks of the weight tile: row_offset is where chunk 4*part of the thread's row
// lies (the kernels' tile layouts differ); the others follow by decode_store_offset (layout header).
template <bool BF16>
__device__ __forceinline__ void decode_weights(uint16_t* wtile, const WeightFetch& f, const float* table,
                                               const AbsmaxSource& am, float mean, int row_offset, int part) {
  float absmax = 0.0f;
  if (f.valid) absmax = am.f32 ? f.absmax_or_scale : decode_absmax(uint8_t(f.fp8), f.absmax_or_scale, mean);
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    const int chunk = decode_store_chunk(part, s);
    // word j of the 16 code bytes holds weights 8j..8j+7 of the thread's 32; byte b: 2b (high), 2b+1 (low)
    const uint32_t w = word_of(f.codes, chunk - 4 * part);
    uint4 out;
    uint32_t* o = reinterpret_cast<uint32_t*>(&out);
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const uint32_t byte = (w >> (8 * b)) & 0xFFu;
      o[b] = pack2<BF16>(mul_rn(table[byte >> 4], absmax), mul_rn(table[byte & 0xFu], absmax));
    }
    *reinterpret_cast<uint4*>(wtile + decode_store_offset(row_offset, chunk, part)) = out;
  }
}

// Epilogue: output elements (row, col) and (row, col + 1) from two fp32 accumulators, plus the bias (forward;
// null in the input gradient), rounded once to the activation dtype; the caller has checked row < M and
// col < out_cols. One 4-byte store when both columns exist and the pair is 4-byte aligned.
template <bool BF16>
__device__ __forceinline__ void store_output_pair(uint16_t* __restrict__ out, const uint16_t* __restrict__ bias,
                                                  int64_t row, int64_t col, int64_t out_cols, float v0, float v1) {
  const bool pair = col + 1 < out_cols;
  if (bias) {
    v0 += act_to_f32<BF16>(bias[col]);
    if (pair) v1 += act_to_f32<BF16>(bias[col + 1]);
  }
  uint16_t* dst = out + row * out_cols + col;
  if (pair && out_cols % 2 == 0) {
    *reinterpret_cast<uint32_t*>(dst) = uint32_t(f32_to_act<BF16>(v0)) | (uint32_t(f32_to_act<BF16>(v1)) << 16);
  } else {
    dst[0] = f32_to_act<BF16>(v0);
    if (pair) dst[1] = f32_to_act<BF16>(v1);
  }
}

// Split-K: the fp32 partial sums of output columns col, col + 1 (col even) of one split, into its [M, out_cols]
// slice of the workspace; the reduce kernel adds the splits, the bias and rounds (reduce_split_partials).
__device__ __forceinline__ void store_partial_pair(float* __restrict__ partial, int64_t row, int64_t col,
                                                   int64_t out_cols, float v0, float v1) {
  const bool pair = col + 1 < out_cols;
  float* dst = partial + row * out_cols + col;
  if (pair && out_cols % 2 == 0) {
    *reinterpret_cast<float2*>(dst) = make_float2(v0, v1);
  } else {
    dst[0] = v0;
    if (pair) dst[1] = v1;
  }
}

// The split-K of problem p for a large-M kernel of `tile_n`-wide tiles, 256 threads and smem_bytes of dynamic
// shared memory, sized by the occupancy of `kernel`. A launcher and its workspace-size function must agree, so
// both call this with the same instance (one per direction and tile width: all instances of one have the same
// launch bounds and shared memory).
inline split::LargeSplit plan_large_split(const void* kernel, int smem_bytes, int tile_n, const Linear4bitProblem& p,
                                          bool grad, int num_sms) {
  if (allow_dynamic_smem(kernel, smem_bytes) != cudaSuccess) {
    cudaGetLastError();  // the occupancy query then answers 1 CTA per SM; the launch reports the error
  }
  const int64_t out_cols = grad ? p.k : p.n, R = grad ? p.n : p.k;
  const int64_t ctas = (out_cols + tile_n - 1) / tile_n * ((p.m + kTileM - 1) / kTileM);
  const int64_t slots = int64_t(num_sms) * ctas_per_sm(kernel, kThreads, smem_bytes);
  return split::large_split(ctas, slots, (R + kTileR - 1) / kTileR, R, p.m, split::split_mode_of(p.split_mode));
}

}  // namespace qlora::cuda::large_tiles
