// Fused 4-bit GEMMs for training-sized M (any M; dispatched for M > kFusedMaxM): forward y = x W^T (+ bias)
// and input gradient dx = dy W on bf16/fp16 tensor cores (mma.sync m16n8k16, sm_80+, runs on sm_90 too).
//
// Classic shared-memory tiled GEMM whose B operand is made on the fly from the packed codes:
// - a CTA of 8 warps computes a 128 x 128 output tile, 64 reduction values per main-loop step;
// - the activation tile (x or dy, 128 x 64) arrives through a 3-stage cp.async pipeline into XOR-swizzled
//   shared memory (zero-filled outside the matrix);
// - the weight tile (64 x 128 values of W: forward 128 rows n x 64 k, input gradient 64 rows n x 128 k) is
//   decoded from 16-byte code loads that were issued one step ahead into registers: table[code] * absmax in
//   fp32, rounded once to bf16/fp16 (the numbers dequantize produces; each thread decodes its absmax once for
//   its 32 weights), stored K-major in swizzled shared memory. The dense W never exists in global memory.
// - ldmatrix feeds the fragments: forward reads W rows as B columns directly; the input gradient reduces over
//   n, so it reads the same K-major tile transposed (ldmatrix .trans): one decoded copy, two orientations.
// Every index formula lives in linear_4bit_large_layout.h, which the CPU test emulates; the copy, fetch, decode
// and epilogue store are shared with the Hopper (wgmma) kernel in linear_4bit_large_tiles.cuh.
// Where the output tiles are too few for one wave (M = 128 at N = 8192: 64 CTAs), blockIdx.z splits the
// reduction steps (split-K, linear_4bit_split.h) and the epilogue writes fp32 partial sums that a second kernel
// adds with the bias (reduce_split_partials).
// Resources (ptxas, CUDA 13.0): 126-128 registers, no spills, on sm_80 and sm_90 (launch bounds: 2 CTAs of 256
// threads per SM); 64 KiB dynamic shared memory per CTA (3 x 16 KiB activation stages + 16 KiB weight tile),
// opted in with cudaFuncSetAttribute (once per device). Not yet run on a GPU: "auto" keeps dequantize + cuBLAS.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda_utils.h"
#include "linear_4bit_cuda.h"
#include "linear_4bit_large_layout.h"
#include "linear_4bit_large_tiles.cuh"
#include "tensor_core_utils.cuh"

namespace qlora::cuda {
namespace {

using namespace qlora::large;
using namespace qlora::cuda::large_tiles;

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// kGrad = false: y [M, N] = x [M, K] W^T (+ bias); output columns n, reduction over k (R = K).
// kGrad = true:  dx [M, K] = dy [M, N] W;           output columns k, reduction over n (R = N).
template <bool BF16, bool kGrad, bool kVecAct>
__global__ void __launch_bounds__(kThreads, 2)
    large_gemm_kernel(const uint16_t* __restrict__ act, const uint8_t* __restrict__ codes, AbsmaxSource am,
                      CodeBook cb, int64_t M, int64_t N, int64_t K, int steps_per_split, float* __restrict__ partial,
                      const uint16_t* __restrict__ bias, uint16_t* __restrict__ out) {
  extern __shared__ __align__(128) uint8_t smem_raw[];
  uint16_t* act_stages = reinterpret_cast<uint16_t*>(smem_raw);
  uint16_t* wtile = act_stages + kStages * kTileElems;
  __shared__ float table[16];

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t R = kGrad ? N : K;                 // reduction length
  const int64_t out_cols = kGrad ? K : N;
  const int64_t m0 = int64_t(blockIdx.y) * kTileM, c0 = int64_t(blockIdx.x) * kTileN;
  // Split-K (gridDim.z > 1): this CTA reduces steps s0 .. s0 + steps - 1 of the whole range; s below counts
  // from 0 within them (pipeline stages and groups), s0 + s is the global step (data).
  const int s0 = int(blockIdx.z) * steps_per_split;
  const int total_steps = int((R + kTileR - 1) / kTileR);
  const int steps = total_steps - s0 < steps_per_split ? total_steps - s0 : steps_per_split;
  const int64_t r0 = int64_t(s0) * kTileR;
  constexpr int kParts = kGrad ? kGradWChunksPerRow / 4 : kFwdWChunksPerRow / 4;  // decode threads per row
  constexpr int kWChunks = kGrad ? kGradWChunksPerRow : kFwdWChunksPerRow;
  const int drow = decode_row(tid, kParts), dpart = decode_part(tid, kParts);

  if (tid < 16) table[tid] = cb.value[tid];
  const float mean = am.f32 ? 0.0f : *am.mean;

  // The weight element a thread fetches at global step g = s0 + s: forward row n = c0 + drow, k = 64 g + 32 part;
  // input gradient row n = 64 g + drow, k = c0 + 32 part.
  // Weight indices in 32 bits (the launcher checks fits_32bit_weight_index; N, K < 2^31).
  auto fetch_step = [&](int s) {
    const uint32_t step = uint32_t(s0 + s);
    const uint32_t n = kGrad ? step * kTileR + drow : uint32_t(c0) + drow;
    const uint32_t k = kGrad ? uint32_t(c0) + 32 * dpart : step * kTileR + 32 * dpart;
    return fetch_weights(codes, am, n, k, uint32_t(N), uint32_t(K));
  };

  // Prologue: activation stages 0..kStages-2 in flight, the first weight fetch in registers.
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < steps) load_act_tile<kVecAct>(act_stages + s * kTileElems, act, M, R, m0, r0 + int64_t(s) * kTileR, tid);
    cp_async_commit();
  }
  WeightFetch fetched = fetch_step(0);

  float acc[kMmaTilesM][kMmaTilesN][4];
#pragma unroll
  for (int i = 0; i < kMmaTilesM; ++i)
#pragma unroll
    for (int j = 0; j < kMmaTilesN; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

  const int wr0 = warp_row0(warp), wc0 = warp_col0(warp);
  // Each lane's ldmatrix offsets for the first tile and k step; the others follow by swizzle_moved.
  const int a_lane = swizzle(ldsm_a_row(lane), ldsm_a_chunk(lane), kActChunksPerRow);
  const int b_lane = kGrad ? swizzle(ldsm_bt_row(lane), ldsm_bt_chunk(lane), kGradWChunksPerRow)
                           : swizzle(ldsm_b_row(lane), ldsm_b_chunk(lane), kFwdWChunksPerRow);
  const uint32_t act_smem = smem_addr(act_stages), w_smem = smem_addr(wtile);
  for (int s = 0; s < steps; ++s) {
    // (1) every warp is done with step s-1: its activation stage and the weight tile may be overwritten
    __syncthreads();
    const int next = s + kStages - 1;
    if (next < steps) {
      load_act_tile<kVecAct>(act_stages + (next % kStages) * kTileElems, act, M, R, m0,
                             r0 + int64_t(next) * kTileR, tid);
    }
    cp_async_commit();  // possibly empty: keeps the group count = steps issued
    decode_weights<BF16>(wtile, fetched, table, am, mean, swizzle(drow, 4 * dpart, kWChunks), dpart);
    if (s + 1 < steps) fetched = fetch_step(s + 1);
    cp_async_wait<kStages - 1>();  // groups 0..s complete (S - 1 + s + 1 committed)
    // (2) activation stage s and the decoded weight tile are visible to every warp
    __syncthreads();

    const uint32_t a_tile = act_smem + (s % kStages) * kTileElems * 2;
#pragma unroll
    for (int ks = 0; ks < kTileR / 16; ++ks) {
      // B fragments of the warp's 4 n8 tiles first, then one A fragment at a time (fewer live registers:
      // 64 accumulators + 8 B + 4 A words, so the kernel fits 128 registers for 2 CTAs per SM).
      uint32_t b[kMmaTilesN][2];
#pragma unroll
      for (int np = 0; np < kMmaTilesN / 2; ++np) {
        uint32_t r[4];
        if constexpr (kGrad) {  // rows n 16 ks.., columns k wc0 + 16 np..
          ldmatrix_x4_trans(r, w_smem + 2 * swizzle_moved(b_lane, 16 * ks, (wc0 + 16 * np) / kChunkElems,
                                                          kGradWChunksPerRow));
        } else {  // rows n wc0 + 16 np.., columns k 16 ks..
          ldmatrix_x4(r, w_smem + 2 * swizzle_moved(b_lane, wc0 + 16 * np, 2 * ks, kFwdWChunksPerRow));
        }
        b[2 * np][0] = r[0];
        b[2 * np][1] = r[1];
        b[2 * np + 1][0] = r[2];
        b[2 * np + 1][1] = r[3];
      }
#pragma unroll
      for (int mt = 0; mt < kMmaTilesM; ++mt) {
        uint32_t a[4];
        ldmatrix_x4(a, a_tile + 2 * swizzle_moved(a_lane, wr0 + 16 * mt, 2 * ks, kActChunksPerRow));
#pragma unroll
        for (int nt = 0; nt < kMmaTilesN; ++nt) mma_16816<BF16>(acc[mt][nt], a, b[nt][0], b[nt][1]);
      }
    }
  }

  // Epilogue: accumulator (mt, nt, 2h + i) is row g + 8h, column 2t + i of the 16 x 8 mma tile.
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int mt = 0; mt < kMmaTilesM; ++mt)
#pragma unroll
    for (int nt = 0; nt < kMmaTilesN; ++nt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t row = m0 + wr0 + mt * 16 + g + 8 * h;
        const int64_t col = c0 + wc0 + nt * 8 + 2 * t;
        if (row >= M || col >= out_cols) continue;
        if (gridDim.z > 1) {
          store_partial_pair(partial + int64_t(blockIdx.z) * M * out_cols, row, col, out_cols, acc[mt][nt][2 * h],
                             acc[mt][nt][2 * h + 1]);
        } else {
          store_output_pair<BF16>(out, kGrad ? nullptr : bias, row, col, out_cols, acc[mt][nt][2 * h],
                                  acc[mt][nt][2 * h + 1]);
        }
      }
}

// The split-K of a problem in one direction, sized by one instance per direction (see plan_large_split).
split::LargeSplit plan_split(const Linear4bitProblem& p, bool grad, int num_sms) {
  const void* kernel = grad ? reinterpret_cast<const void*>(large_gemm_kernel<true, true, true>)
                            : reinterpret_cast<const void*>(large_gemm_kernel<true, false, true>);
  return plan_large_split(kernel, kSmemBytes, kTileN, p, grad, num_sms);
}

template <bool BF16, bool kGrad, bool kVecAct>
cudaError_t launch(const Linear4bitProblem& p, const void* act, const void* bias, void* out, float* ws, int num_sms,
                   cudaStream_t stream) {
  auto kernel = large_gemm_kernel<BF16, kGrad, kVecAct>;
  QLORA_CUDA_RETURN_IF_ERROR(allow_dynamic_smem(reinterpret_cast<const void*>(kernel), kSmemBytes));
  const split::LargeSplit sp = plan_split(p, kGrad, num_sms);
  if (sp.splits > 1 && ws == nullptr) return cudaErrorInvalidValue;  // the workspace size was not asked
  const int64_t out_cols = kGrad ? p.k : p.n;
  const dim3 grid(unsigned((out_cols + kTileN - 1) / kTileN), unsigned((p.m + kTileM - 1) / kTileM),
                  unsigned(sp.splits));
  kernel<<<grid, kThreads, kSmemBytes, stream>>>(static_cast<const uint16_t*>(act), p.codes, p.absmax, p.codebook,
                                                 p.m, p.n, p.k, int(sp.steps_per_split), ws,
                                                 static_cast<const uint16_t*>(bias), static_cast<uint16_t*>(out));
  QLORA_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  if (sp.splits > 1) return reduce_split_partials(ws, sp.splits, p.m, out_cols, bias, out, BF16, stream);
  return cudaSuccess;
}

bool valid_large(const Linear4bitProblem& p) {
  // grid.y = M / 128 <= 65535; grid.x = N or K / 128 < 2^31
  return p.blocksize == 64 && p.k % 64 == 0 && p.k >= 64 && p.m >= 1 && p.n >= 1 &&
         (p.m + kTileM - 1) / kTileM <= 65535 && fits_32bit_weight_index(p.n, p.k) && p.codes != nullptr &&
         reinterpret_cast<uintptr_t>(p.codes) % 16 == 0;
}

}  // namespace

int64_t fused_large_workspace_bytes(const Linear4bitProblem& p, bool grad, int num_sms) {
  if (!valid_large(p)) return 0;
  const split::LargeSplit sp = plan_split(p, grad, num_sms);
  return sp.splits > 1 ? sp.splits * p.m * (grad ? p.k : p.n) * int64_t(sizeof(float)) : 0;
}

cudaError_t fused_large_linear_forward(const Linear4bitProblem& p, const void* x, const void* bias, void* y,
                                       float* workspace, int num_sms, cudaStream_t stream) {
  QLORA_NVTX_RANGE_FN();
  if (!valid_large(p) || reinterpret_cast<uintptr_t>(x) % 16 != 0) return cudaErrorInvalidValue;
  return p.bf16 ? launch<true, false, true>(p, x, bias, y, workspace, num_sms, stream)
                : launch<false, false, true>(p, x, bias, y, workspace, num_sms, stream);
}

cudaError_t fused_large_linear_grad_input(const Linear4bitProblem& p, const void* dy, void* dx, float* workspace,
                                          int num_sms, cudaStream_t stream) {
  QLORA_NVTX_RANGE_FN();
  if (!valid_large(p)) return cudaErrorInvalidValue;
  const bool vec = p.n % kChunkElems == 0 && reinterpret_cast<uintptr_t>(dy) % 16 == 0;
  if (p.bf16) {
    return vec ? launch<true, true, true>(p, dy, nullptr, dx, workspace, num_sms, stream)
               : launch<true, true, false>(p, dy, nullptr, dx, workspace, num_sms, stream);
  }
  return vec ? launch<false, true, true>(p, dy, nullptr, dx, workspace, num_sms, stream)
             : launch<false, true, false>(p, dy, nullptr, dx, workspace, num_sms, stream);
}

}  // namespace qlora::cuda
