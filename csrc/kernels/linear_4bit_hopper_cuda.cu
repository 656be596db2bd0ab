// Fused 4-bit GEMMs for training-sized M on Hopper (sm_90a): forward y = x W^T (+ bias) and input gradient
// dx = dy W with wgmma (warpgroup MMA), which mma.sync cannot match on Hopper (it tops out near 75% of the
// tensor cores' peak there).
//
// Same activation pipeline and weight decode as the mma.sync kernel (linear_4bit_large_cuda.cu; shared pieces
// in linear_4bit_large_tiles.cuh): a CTA of two warpgroups computes a 128 x TN output tile (TN = 128, or 256
// for half the activation traffic per flop), 64 reduction values per main-loop step; the activation tile
// arrives by cp.async (3 stages), the weight tile is decoded from packed codes fetched one step ahead. What
// changes:
// - the tiles are laid out as wgmma's canonical 128-byte-swizzle layouts (linear_4bit_large_layout.h): the
//   activation and forward weight tiles already are; the input gradient's weight tile is stored MN-major so
//   wgmma reads it transposed (its "transpose B" bit): one decoded copy, no transposition by any thread;
// - each warpgroup issues four m64nTNk16 wgmmas per step from shared-memory descriptors, asynchronously: while
//   the tensor cores run step s, the threads decode step s + 1's weights into the second weight buffer and
//   copy activations ahead (wgmma.wait_group 1 + a barrier tell when a buffer is free again);
// - shared-memory writes by threads (st.shared, cp.async) become visible to wgmma (the async proxy) through
//   fence.proxy.async before the barrier that precedes the wgmma.
// The kernel body exists only in the sm_90a image (__CUDA_ARCH_FEAT_SM90_ALL); hopper_gemm_available() asks the
// loaded image by a probe kernel, so a build without sm_90a (or another GPU) keeps the mma.sync kernel.
// Resources (ptxas, CUDA 13.0, sm_90a), no spills: TN = 128: 109-124 registers, 2 CTAs of 256 threads per SM,
// 81 KiB dynamic shared memory (3 x 16 KiB activation stages, 2 x 16 KiB weight tiles, 1 KiB to round the base
// up to 1024 bytes); TN = 256: 197-212 registers, 1 CTA per SM, 113 KiB. tests/test_sass.py checks the SASS:
// four HGMMA per kernel, no spills. The launchers take TN = 256 when the output has more than 128 columns, and
// split K over blockIdx.z where the tiles are too few for one wave, as the mma.sync kernel does.
// Not yet run on a GPU: only the opt-in "fused" backend uses it.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <mutex>

#include "cuda_utils.h"
#include "linear_4bit_cuda.h"
#include "linear_4bit_large_layout.h"
#include "linear_4bit_large_tiles.cuh"
#include "tensor_core_utils.cuh"

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define QLORA_HAS_WGMMA 1
#else
#define QLORA_HAS_WGMMA 0
#endif

namespace qlora::cuda {
namespace {

using namespace qlora::large;
using namespace qlora::cuda::large_tiles;

#if QLORA_HAS_WGMMA
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}
// Pins the accumulators in place around the asynchronous wgmma: without it the compiler could move ordinary
// arithmetic on them (the epilogue's conversions) across a wait_group, whose asm names no registers (CUTLASS
// does the same with warpgroup_fence_operand).
template <int N>
__device__ __forceinline__ void fence_accumulators(float (&acc)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(acc[i])::"memory");
}
// Generic-proxy shared-memory writes (st.shared, cp.async) of this thread become visible to the async proxy.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Operand lists of the wgmma asm below: the accumulator registers' placeholders and their "+f" bindings.
#define QLORA_WGMMA_REGS_0_63 \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define QLORA_WGMMA_REGS_64_127 \
  "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
  "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, " \
  "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
  "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
#define QLORA_WGMMA_ACC8(B)                                                                   \
  "+f"(d[(B) + 0]), "+f"(d[(B) + 1]), "+f"(d[(B) + 2]), "+f"(d[(B) + 3]), "+f"(d[(B) + 4]), "+f"(d[(B) + 5]), \
      "+f"(d[(B) + 6]), "+f"(d[(B) + 7])
#define QLORA_WGMMA_ACC64(B)                                                                          \
  QLORA_WGMMA_ACC8(B), QLORA_WGMMA_ACC8((B) + 8), QLORA_WGMMA_ACC8((B) + 16), QLORA_WGMMA_ACC8((B) + 24), \
      QLORA_WGMMA_ACC8((B) + 32), QLORA_WGMMA_ACC8((B) + 40), QLORA_WGMMA_ACC8((B) + 48),                 \
      QLORA_WGMMA_ACC8((B) + 56)

// m64n128k16 / m64n256k16 with fp32 accumulators d[0..63] / d[0..127]; DT: bf16 or f16; TNSPB: 0 (B K-major)
// or 1 (B MN-major). scale-d is the predicate p = 1 (accumulate), the A and B scales +1, A not transposed.
#define QLORA_WGMMA_M64N128K16(DT, TNSPB)                                                               \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                           \
               "wgmma.mma_async.sync.aligned.m64n128k16.f32." DT "." DT " {" QLORA_WGMMA_REGS_0_63     \
               "}, %64, %65, p, 1, 1, 0, " #TNSPB ";\n}\n"                                           \
               : QLORA_WGMMA_ACC64(0)                                                                  \
               : "l"(desc_a), "l"(desc_b), "r"(1))
#define QLORA_WGMMA_M64N256K16(DT, TNSPB)                                                               \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"                                          \
               "wgmma.mma_async.sync.aligned.m64n256k16.f32." DT "." DT " {" QLORA_WGMMA_REGS_0_63     \
               ", " QLORA_WGMMA_REGS_64_127 "}, %128, %129, p, 1, 1, 0, " #TNSPB ";\n}\n"              \
               : QLORA_WGMMA_ACC64(0), QLORA_WGMMA_ACC64(64)                                           \
               : "l"(desc_a), "l"(desc_b), "r"(1))

// d (64 x kTN fp32, this warpgroup's accumulator fragment) += A (64 x 16, descriptor) * B (16 x kTN,
// descriptor); kTransB: B is MN-major in shared memory.
template <int kTN, bool BF16, bool kTransB>
__device__ __forceinline__ void wgmma_m64k16(float (&d)[hopper_acc_regs(kTN)], uint64_t desc_a, uint64_t desc_b) {
  static_assert(kTN == 128 || kTN == 256, "tile width 128 or 256");
  if constexpr (kTN == 128) {
    if constexpr (BF16) {
      if constexpr (kTransB) QLORA_WGMMA_M64N128K16("bf16", 1); else QLORA_WGMMA_M64N128K16("bf16", 0);
    } else {
      if constexpr (kTransB) QLORA_WGMMA_M64N128K16("f16", 1); else QLORA_WGMMA_M64N128K16("f16", 0);
    }
  } else {
    if constexpr (BF16) {
      if constexpr (kTransB) QLORA_WGMMA_M64N256K16("bf16", 1); else QLORA_WGMMA_M64N256K16("bf16", 0);
    } else {
      if constexpr (kTransB) QLORA_WGMMA_M64N256K16("f16", 1); else QLORA_WGMMA_M64N256K16("f16", 0);
    }
  }
}
#endif

// kGrad = false: y [M, N] = x [M, K] W^T (+ bias); output columns n, reduction over k (R = K).
// kGrad = true:  dx [M, K] = dy [M, N] W;           output columns k, reduction over n (R = N).
// kTN: output columns per CTA (128: 2 CTAs per SM; 256: one, half the activation traffic per flop).
template <int kTN, bool BF16, bool kGrad, bool kVecAct>
__global__ void __launch_bounds__(kThreads, kTN == 128 ? 2 : 1)
    hopper_gemm_kernel(const uint16_t* __restrict__ act, const uint8_t* __restrict__ codes, AbsmaxSource am,
                       CodeBook cb, int64_t M, int64_t N, int64_t K, int steps_per_split,
                       float* __restrict__ partial, const uint16_t* __restrict__ bias, uint16_t* __restrict__ out) {
#if QLORA_HAS_WGMMA
  constexpr int kWTileElems = hopper_weight_tile_elems(kTN);
  constexpr int kAcc = hopper_acc_regs(kTN);
  constexpr int kUnits = hopper_decode_units(kTN);          // 32-weight decode units per thread and step
  constexpr int kParts = hopper_decode_parts(kGrad, kTN);   // units per weight-tile row
  extern __shared__ uint8_t smem_raw[];
  // wgmma's swizzle is computed from address bits 4-9: every tile starts on a 1024-byte boundary
  const uint32_t raw_addr = smem_addr(smem_raw);
  uint8_t* smem = smem_raw + ((kHopperSmemAlign - raw_addr % kHopperSmemAlign) % kHopperSmemAlign);
  uint16_t* act_stages = reinterpret_cast<uint16_t*>(smem);
  uint16_t* wtiles = act_stages + kStages * kTileElems;
  __shared__ float table[16];

  const int tid = threadIdx.x, warpgroup = tid / 128;
  const int64_t R = kGrad ? N : K;  // reduction length
  const int64_t out_cols = kGrad ? K : N;
  const int64_t m0 = int64_t(blockIdx.y) * kTileM, c0 = int64_t(blockIdx.x) * kTN;
  // Split-K (gridDim.z > 1): this CTA reduces steps s0 .. s0 + steps - 1 of the whole range; s below counts
  // from 0 within them (pipeline stages, weight buffers, groups), s0 + s is the global step (data).
  const int s0 = int(blockIdx.z) * steps_per_split;
  const int total_steps = int((R + kTileR - 1) / kTileR);
  const int steps = total_steps - s0 < steps_per_split ? total_steps - s0 : steps_per_split;
  const int64_t r0 = int64_t(s0) * kTileR;
  int drow[kUnits], dpart[kUnits], drow_offset[kUnits];
#pragma unroll
  for (int u = 0; u < kUnits; ++u) {
    drow[u] = decode_row(tid + u * kThreads, kParts);
    dpart[u] = decode_part(tid + u * kThreads, kParts);
    drow_offset[u] = hopper_decode_row_offset(kGrad, drow[u], dpart[u]);
  }

  if (tid < 16) table[tid] = cb.value[tid];
  const float mean = am.f32 ? 0.0f : *am.mean;
  __syncthreads();  // the table, before the first decode

  // The weights unit u fetches at global step g = s0 + s: forward row n = c0 + row, k = 64 g + 32 part; input
  // gradient row n = 64 g + row, k = c0 + 32 part (32-bit indices: the launcher checks).
  WeightFetch fetched[kUnits];
  auto fetch_step = [&](int s) {
    const uint32_t step = uint32_t(s0 + s);
#pragma unroll
    for (int u = 0; u < kUnits; ++u) {
      const uint32_t n = kGrad ? step * kTileR + drow[u] : uint32_t(c0) + drow[u];
      const uint32_t k = kGrad ? uint32_t(c0) + 32 * dpart[u] : step * kTileR + 32 * dpart[u];
      fetched[u] = fetch_weights(codes, am, n, k, uint32_t(N), uint32_t(K));
    }
  };
  auto decode_step = [&](uint16_t* wtile) {
#pragma unroll
    for (int u = 0; u < kUnits; ++u) decode_weights<BF16>(wtile, fetched[u], table, am, mean, drow_offset[u], dpart[u]);
  };

  // Prologue: activation stages 0 and 1 in flight; step 0's weights decoded; step 1's fetched.
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < steps) load_act_tile<kVecAct>(act_stages + s * kTileElems, act, M, R, m0, r0 + int64_t(s) * kTileR, tid);
    cp_async_commit();
  }
  fetch_step(0);
  decode_step(wtiles);
  if (steps > 1) fetch_step(1);
  cp_async_wait<kStages - 2>();  // stage 0 has landed
  fence_proxy_async();
  __syncthreads();

  float acc[kAcc];
#pragma unroll
  for (int i = 0; i < kAcc; ++i) acc[i] = 0.0f;

  const uint32_t act_smem = smem_addr(act_stages), w_smem = smem_addr(wtiles);
  constexpr uint32_t kBLbo = kGrad ? kGradLbo : kKMajorLbo, kBSbo = kGrad ? kGradSbo : kKMajorSbo;
  for (int s = 0; s < steps; ++s) {
    // Activation stage s and weight buffer s % 2 are complete and visible to wgmma.
    const uint32_t a_tile = act_smem + (s % kStages) * kTileElems * 2;
    const uint32_t b_tile = w_smem + (s % kHopperWeightBuffers) * kWTileElems * 2;
    fence_accumulators(acc);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < kTileR / 16; ++ks) {
      const uint64_t da = wgmma_desc(a_tile + hopper_a_offset(warpgroup, ks), kKMajorLbo, kKMajorSbo);
      const uint64_t db = wgmma_desc(b_tile + hopper_b_offset(kGrad, ks), kBLbo, kBSbo);
      wgmma_m64k16<kTN, BF16, kGrad>(acc, da, db);
    }
    wgmma_commit();
    // While step s runs on the tensor cores: step s - 1's wgmma (the last reader of activation stage
    // (s + 2) % 3 and of weight buffer (s + 1) % 2) is complete in this warpgroup, then in both.
    wgmma_wait<1>();
    __syncthreads();
    if (s + kStages - 1 < steps) {
      load_act_tile<kVecAct>(act_stages + ((s + kStages - 1) % kStages) * kTileElems, act, M, R, m0,
                             r0 + int64_t(s + kStages - 1) * kTileR, tid);
    }
    cp_async_commit();  // possibly empty: keeps the group count = steps issued
    if (s + 1 < steps) {
      decode_step(wtiles + ((s + 1) % kHopperWeightBuffers) * kWTileElems);
      if (s + 2 < steps) fetch_step(s + 2);
    }
    cp_async_wait<kStages - 2>();  // groups 0..s+1 complete: activation stage s + 1 has landed
    fence_proxy_async();
    __syncthreads();
  }
  wgmma_wait<0>();
  fence_accumulators(acc);

  // Epilogue: register r of thread tid is CTA-tile element (hopper_acc_row, hopper_acc_col); r and r + 1 are
  // neighbouring columns.
#pragma unroll
  for (int r = 0; r < kAcc; r += 2) {
    const int64_t row = m0 + hopper_acc_row(tid, r);
    const int64_t col = c0 + hopper_acc_col(tid, r);
    if (row >= M || col >= out_cols) continue;
    if (gridDim.z > 1) {
      store_partial_pair(partial + int64_t(blockIdx.z) * M * out_cols, row, col, out_cols, acc[r], acc[r + 1]);
    } else {
      store_output_pair<BF16>(out, kGrad ? nullptr : bias, row, col, out_cols, acc[r], acc[r + 1]);
    }
  }
#else
  __trap();  // never launched: hopper_gemm_available() is false for images without sm_90a features
#endif
}

// Writes 1 from an sm_90a image (the one that has the wgmma kernel body), 0 from any other.
__global__ void hopper_probe_kernel(int* out) { *out = QLORA_HAS_WGMMA; }

// The split-K of a problem in one direction and tile width, sized by one instance of each (see plan_large_split).
template <int kTN>
split::LargeSplit plan_split(const Linear4bitProblem& p, bool grad, int num_sms) {
  const void* kernel = grad ? reinterpret_cast<const void*>(hopper_gemm_kernel<kTN, true, true, true>)
                            : reinterpret_cast<const void*>(hopper_gemm_kernel<kTN, true, false, true>);
  return plan_large_split(kernel, hopper_smem_bytes(kTN), kTN, p, grad, num_sms);
}

template <int kTN, bool BF16, bool kGrad, bool kVecAct>
cudaError_t launch_tile(const Linear4bitProblem& p, const void* act, const void* bias, void* out, float* ws,
                        int num_sms, cudaStream_t stream) {
  auto kernel = hopper_gemm_kernel<kTN, BF16, kGrad, kVecAct>;
  constexpr int kSmem = hopper_smem_bytes(kTN);
  QLORA_CUDA_RETURN_IF_ERROR(allow_dynamic_smem(reinterpret_cast<const void*>(kernel), kSmem));
  const split::LargeSplit sp = plan_split<kTN>(p, kGrad, num_sms);
  if (sp.splits > 1 && ws == nullptr) return cudaErrorInvalidValue;  // the workspace size was not asked
  const int64_t out_cols = kGrad ? p.k : p.n;
  const dim3 grid(unsigned((out_cols + kTN - 1) / kTN), unsigned((p.m + kTileM - 1) / kTileM), unsigned(sp.splits));
  kernel<<<grid, kThreads, kSmem, stream>>>(static_cast<const uint16_t*>(act), p.codes, p.absmax, p.codebook, p.m,
                                            p.n, p.k, int(sp.steps_per_split), ws, static_cast<const uint16_t*>(bias),
                                            static_cast<uint16_t*>(out));
  QLORA_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  if (sp.splits > 1) return reduce_split_partials(ws, sp.splits, p.m, out_cols, bias, out, BF16, stream);
  return cudaSuccess;
}

template <bool BF16, bool kGrad, bool kVecAct>
cudaError_t launch(const Linear4bitProblem& p, int tile_n, const void* act, const void* bias, void* out, float* ws,
                   int num_sms, cudaStream_t stream) {
  return tile_n == 256 ? launch_tile<256, BF16, kGrad, kVecAct>(p, act, bias, out, ws, num_sms, stream)
                       : launch_tile<128, BF16, kGrad, kVecAct>(p, act, bias, out, ws, num_sms, stream);
}

bool valid_hopper(const Linear4bitProblem& p) {
  return p.blocksize == 64 && p.k % 64 == 0 && p.k >= 64 && p.m >= 1 && p.n >= 1 &&
         (p.m + kTileM - 1) / kTileM <= 65535 && fits_32bit_weight_index(p.n, p.k) && p.codes != nullptr &&
         reinterpret_cast<uintptr_t>(p.codes) % 16 == 0;
}

// The probe's answer per device: kUnknown (not asked yet, or the probe could not run), kNo, kYes.
constexpr int kMaxDevices = 64;
constexpr int kUnknown = 0, kNo = 1, kYes = 2;
std::atomic<int> g_wgmma[kMaxDevices] = {};
std::mutex g_probe_mutex;

// Launches the probe on `stream` and waits for it: 1 or 0, or -1 if it could not run. Never during a CUDA
// graph capture (the caller checks): an allocation and a synchronization are not allowed there.
int probe(cudaStream_t stream) {
  int* d_flag = nullptr;
  int flag = 0;
  cudaGetLastError();  // an earlier caller's pending error must not read as the probe's failure
  // plain cudaMalloc: the stream-ordered allocator is not on every platform, and this runs once per device
  if (cudaMalloc(reinterpret_cast<void**>(&d_flag), sizeof(int)) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  hopper_probe_kernel<<<1, 1, 0, stream>>>(d_flag);
  cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) err = cudaMemcpyAsync(&flag, d_flag, sizeof(int), cudaMemcpyDeviceToHost, stream);
  if (err == cudaSuccess) err = cudaStreamSynchronize(stream);
  const cudaError_t free_err = cudaFree(d_flag);
  if (err == cudaSuccess) err = free_err;
  if (err != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  return flag;
}

}  // namespace

bool hopper_gemm_available(int device, cudaStream_t stream) {
  if (device < 0 || device >= kMaxDevices) return false;
  const int known = g_wgmma[device].load(std::memory_order_acquire);
  if (known != kUnknown) return known == kYes;
  const std::lock_guard<std::mutex> lock(g_probe_mutex);
  if (g_wgmma[device].load(std::memory_order_relaxed) == kUnknown) {
    int major = 0, minor = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
      cudaGetLastError();  // unknown for now: the caller takes the mma.sync kernel this time
      return false;
    }
    if (major != 9 || minor != 0) {
      g_wgmma[device].store(kNo, std::memory_order_release);
    } else {
      cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
      if (cudaStreamIsCapturing(stream, &capture) == cudaSuccess && capture == cudaStreamCaptureStatusNone) {
        const int answer = probe(stream);
        if (answer >= 0) g_wgmma[device].store(answer == 1 ? kYes : kNo, std::memory_order_release);
      } else {
        cudaGetLastError();
      }
    }
  }
  return g_wgmma[device].load(std::memory_order_acquire) == kYes;
}

int hopper_tile_n(const Linear4bitProblem& p, bool grad, int requested) {
  if (requested == 128 || requested == 256) return requested;
  // Automatic: the wide tile (half the activation traffic per flop) once there are columns for it.
  return (grad ? p.k : p.n) > 128 ? 256 : 128;
}

int64_t hopper_workspace_bytes(const Linear4bitProblem& p, bool grad, int tile_n, int num_sms) {
  if (!valid_hopper(p)) return 0;
  const split::LargeSplit sp = hopper_tile_n(p, grad, tile_n) == 256 ? plan_split<256>(p, grad, num_sms)
                                                                      : plan_split<128>(p, grad, num_sms);
  return sp.splits > 1 ? sp.splits * p.m * (grad ? p.k : p.n) * int64_t(sizeof(float)) : 0;
}

cudaError_t hopper_linear_forward(const Linear4bitProblem& p, const void* x, const void* bias, void* y,
                                  int tile_n, float* workspace, int num_sms, cudaStream_t stream) {
  QLORA_NVTX_RANGE_FN();
  if (!valid_hopper(p) || reinterpret_cast<uintptr_t>(x) % 16 != 0) return cudaErrorInvalidValue;
  const int tn = hopper_tile_n(p, false, tile_n);
  return p.bf16 ? launch<true, false, true>(p, tn, x, bias, y, workspace, num_sms, stream)
                : launch<false, false, true>(p, tn, x, bias, y, workspace, num_sms, stream);
}

cudaError_t hopper_linear_grad_input(const Linear4bitProblem& p, const void* dy, void* dx, int tile_n,
                                     float* workspace, int num_sms, cudaStream_t stream) {
  QLORA_NVTX_RANGE_FN();
  if (!valid_hopper(p)) return cudaErrorInvalidValue;
  const int tn = hopper_tile_n(p, true, tile_n);
  const bool vec = p.n % kChunkElems == 0 && reinterpret_cast<uintptr_t>(dy) % 16 == 0;
  if (p.bf16) {
    return vec ? launch<true, true, true>(p, tn, dy, nullptr, dx, workspace, num_sms, stream)
               : launch<true, true, false>(p, tn, dy, nullptr, dx, workspace, num_sms, stream);
  }
  return vec ? launch<false, true, true>(p, tn, dy, nullptr, dx, workspace, num_sms, stream)
             : launch<false, true, false>(p, tn, dy, nullptr, dx, workspace, num_sms, stream);
}

}  // namespace qlora::cuda
