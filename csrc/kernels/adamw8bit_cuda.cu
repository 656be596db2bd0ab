// CUDA kernels of the 8-bit-state AdamW step and of the dynamic-map (de)quantization. One warp owns one
// 256-element block at a time (8 consecutive elements per lane, moved with 8-byte code and 16/32-byte
// parameter accesses), so the block's new absmax is a 5-step shuffle reduction with no shared memory and no
// block barrier. Warps walk the blocks of all tensors of a step with a grid-stride loop and find a block's
// tensor by binary search in the device table, so a parameter group costs one launch and no host sync.
// Each thread block first builds both code maps (values and midpoints) in shared memory from
// adamw8bit_core.h's formula; the arithmetic is adamw_core.h's, rounded op by op, so the bits (codes,
// absmax, parameters) match the CPU kernel.
#include "adamw8bit_cuda.h"
#include "cuda_utils.h"
#include "vector_store.cuh"

namespace qlora::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kPerLane = kAdamW8bitBlock / 32;  // 8 elements per lane
static_assert(kPerLane == 8, "the vector accesses below move 8 elements");

struct SharedMaps {
  float value[2][kDynamicMapSize];  // [0] signed (exp_avg), [1] unsigned (exp_avg_sq)
  float mid[2][kDynamicMapSize];
};

// Thread t of the block builds code t of both maps (blockDim.x == 256 == kDynamicMapSize).
__device__ void build_maps(SharedMaps& s) {
  static_assert(kThreads == kDynamicMapSize, "one thread per code");
  dynamic_map_entry(threadIdx.x, true, s.value[0], s.mid[0]);
  dynamic_map_entry(threadIdx.x, false, s.value[1], s.mid[1]);
  __syncthreads();
}

template <FloatFormat F>
struct Access8;

template <>
struct Access8<FloatFormat::F32> {
  static __device__ void load(const void* x, int64_t i, float (&v)[kPerLane]) {
    const float4* p = reinterpret_cast<const float4*>(static_cast<const float*>(x) + i);
    const float4 a = p[0], b = p[1];
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
  }
  static __device__ void store(void* x, int64_t i, const float (&v)[kPerLane]) {
    float* p = static_cast<float*>(x) + i;
    store_global_v4(p, v[0], v[1], v[2], v[3]);
    store_global_v4(p + 4, v[4], v[5], v[6], v[7]);
  }
  static __device__ float load1(const void* x, int64_t i) { return static_cast<const float*>(x)[i]; }
  static __device__ void store1(void* x, int64_t i, float v) { static_cast<float*>(x)[i] = v; }
};

// 16-bit formats: raw bits through numeric_core's round-to-nearest-even conversions.
template <FloatFormat F>
struct Access8Half {
  static __device__ float to_f32(uint32_t b) {
    if constexpr (F == FloatFormat::BF16) return bf16_to_f32(uint16_t(b));
    return f16_to_f32(uint16_t(b));
  }
  static __device__ uint32_t from_f32(float v) {
    if constexpr (F == FloatFormat::BF16) return f32_to_bf16_rn(v);
    return f32_to_f16_rn(v);
  }
  static __device__ void load(const void* x, int64_t i, float (&v)[kPerLane]) {
    const uint4 r = *reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(x) + i);
    const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) v[2 * k] = to_f32(w[k] & 0xFFFFu), v[2 * k + 1] = to_f32(w[k] >> 16);
  }
  static __device__ void store(void* x, int64_t i, const float (&v)[kPerLane]) {
    uint32_t w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) w[k] = from_f32(v[2 * k]) | (from_f32(v[2 * k + 1]) << 16);
    store_global_v4(static_cast<uint16_t*>(x) + i, w[0], w[1], w[2], w[3]);
  }
  static __device__ float load1(const void* x, int64_t i) { return to_f32(static_cast<const uint16_t*>(x)[i]); }
  static __device__ void store1(void* x, int64_t i, float v) { static_cast<uint16_t*>(x)[i] = uint16_t(from_f32(v)); }
};
template <>
struct Access8<FloatFormat::BF16> : Access8Half<FloatFormat::BF16> {};
template <>
struct Access8<FloatFormat::F16> : Access8Half<FloatFormat::F16> {};

__device__ void load_codes(const uint8_t* c, int64_t i, uint8_t (&out)[kPerLane]) {
  const uint2 r = *reinterpret_cast<const uint2*>(c + i);
#pragma unroll
  for (int k = 0; k < 4; ++k) out[k] = uint8_t(r.x >> (8 * k)), out[k + 4] = uint8_t(r.y >> (8 * k));
}

__device__ void store_codes(uint8_t* c, int64_t i, const uint8_t (&in)[kPerLane]) {
  uint32_t lo = 0u, hi = 0u;
#pragma unroll
  for (int k = 0; k < 4; ++k) lo |= uint32_t(in[k]) << (8 * k), hi |= uint32_t(in[k + 4]) << (8 * k);
  store_global_v2(c + i, lo, hi);
}

// The block absmax of the whole warp: each lane's fold of its elements, then absmax_fold's rule (larger
// wins; the partials are never NaN) over the butterfly.
__device__ float warp_absmax(float acc) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float other = __shfl_xor_sync(0xFFFFFFFFu, acc, o);
    acc = other > acc ? other : acc;
  }
  return acc;
}

// Block b (0-based within t): elements [b*256, min(numel, b*256+256)); this lane's 8 start at e.
template <FloatFormat F>
__device__ void adamw8bit_block(const AdamW8bitTensor& t, const AdamWGroup& h, const SharedMaps& maps, int64_t b,
                                int lane) {
  using A = Access8<F>;
  const int64_t e = b * kAdamW8bitBlock + int64_t(lane) * kPerLane;
  const bool whole = t.vector_aligned && e + kPerLane <= t.numel;
  float p[kPerLane], g[kPerLane], m[kPerLane], v[kPerLane];
  uint8_t c1[kPerLane], c2[kPerLane];
  if (whole) {
    A::load(t.param, e, p);
    A::load(t.grad, e, g);
    load_codes(t.exp_avg_codes, e, c1);
    load_codes(t.exp_avg_sq_codes, e, c2);
  } else {
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const bool in = e + k < t.numel;
      p[k] = in ? A::load1(t.param, e + k) : 0.0f;
      g[k] = in ? A::load1(t.grad, e + k) : 0.0f;
      c1[k] = in ? t.exp_avg_codes[e + k] : uint8_t(kDynamicSignedZeroCode);
      c2[k] = in ? t.exp_avg_sq_codes[e + k] : uint8_t(kDynamicUnsignedZeroCode);
    }
  }
  const float absmax1 = t.exp_avg_absmax[b], absmax2 = t.exp_avg_sq_absmax[b];
  float acc1 = 0.0f, acc2 = 0.0f;
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    m[k] = dynamic_decode(c1[k], maps.value[0], absmax1);
    v[k] = dynamic_decode(c2[k], maps.value[1], absmax2);
    p[k] = adamw_update(p[k], g[k], m[k], v[k], h, t.neg_step_size, t.bias_correction2_sqrt);
    if (e + k < t.numel) acc1 = absmax_fold(acc1, m[k]), acc2 = absmax_fold(acc2, v[k]);
  }
  const float new1 = warp_absmax(acc1), new2 = warp_absmax(acc2);
  const float pre1 = absmax_prescale(new1), inv1 = block_inverse(new1);
  const float pre2 = absmax_prescale(new2), inv2 = block_inverse(new2);
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    c1[k] = dynamic_quantize(m[k], maps.mid[0], pre1, inv1);
    c2[k] = dynamic_quantize(v[k], maps.mid[1], pre2, inv2);
  }
  if (whole) {
    A::store(t.param, e, p);
    store_codes(t.exp_avg_codes, e, c1);
    store_codes(t.exp_avg_sq_codes, e, c2);
  } else {
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      if (e + k < t.numel) {
        A::store1(t.param, e + k, p[k]);
        t.exp_avg_codes[e + k] = c1[k];
        t.exp_avg_sq_codes[e + k] = c2[k];
      }
    }
  }
  if (lane == 0) {
    t.exp_avg_absmax[b] = new1;
    t.exp_avg_sq_absmax[b] = new2;
  }
}

// ptxas (CUDA 13, sm_80/sm_90): 80 registers, no spills, so 3 blocks (24 warps) per SM. A bound of 4 blocks
// per SM forces 64 registers with 12-24 bytes of spills; which is faster is for the GPU benchmark to say.
__global__ void __launch_bounds__(kThreads)
    kAdamW8bitMultiTensor(const AdamW8bitTensor* __restrict__ tensors, int ntensors, int64_t total_blocks,
                          AdamWGroup h) {
  __shared__ SharedMaps maps;
  build_maps(maps);
  const int lane = threadIdx.x % 32;
  const int64_t warps = int64_t(gridDim.x) * kWarps;
  for (int64_t block = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32; block < total_blocks; block += warps) {
    // The last tensor whose first block is not after this one (the lanes search the same addresses).
    int lo = 0, hi = ntensors - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (tensors[mid].first_block <= block) lo = mid; else hi = mid - 1;
    }
    const AdamW8bitTensor& t = tensors[lo];
    const int64_t b = block - t.first_block;
    switch (t.format) {
      case FloatFormat::BF16: adamw8bit_block<FloatFormat::BF16>(t, h, maps, b, lane); break;
      case FloatFormat::F16: adamw8bit_block<FloatFormat::F16>(t, h, maps, b, lane); break;
      default: adamw8bit_block<FloatFormat::F32>(t, h, maps, b, lane); break;
    }
  }
}

// One warp per block, like the step: fold, reduce, encode.
__global__ void __launch_bounds__(kThreads)
    kQuantize8bitDynamic(const float* __restrict__ x, int64_t n, int map_index, uint8_t* __restrict__ codes,
                         float* __restrict__ absmax) {
  __shared__ SharedMaps maps;
  build_maps(maps);
  const int lane = threadIdx.x % 32;
  const int64_t nblocks = adamw8bit_blocks(n), warps = int64_t(gridDim.x) * kWarps;
  for (int64_t b = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32; b < nblocks; b += warps) {
    const int64_t e = b * kAdamW8bitBlock + int64_t(lane) * kPerLane;
    float acc = 0.0f;
    for (int k = 0; k < kPerLane; ++k) acc = e + k < n ? absmax_fold(acc, x[e + k]) : acc;
    const float a = warp_absmax(acc);
    const float pre = absmax_prescale(a), inv = block_inverse(a);
    for (int k = 0; k < kPerLane; ++k) {
      if (e + k < n) codes[e + k] = dynamic_quantize(x[e + k], maps.mid[map_index], pre, inv);
    }
    if (lane == 0) absmax[b] = a;
  }
}

__global__ void __launch_bounds__(kThreads)
    kDequantize8bitDynamic(const uint8_t* __restrict__ codes, const float* __restrict__ absmax, int64_t n,
                           int map_index, float* __restrict__ out) {
  __shared__ SharedMaps maps;
  build_maps(maps);
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < n; i += int64_t(gridDim.x) * kThreads) {
    out[i] = dynamic_decode(codes[i], maps.value[map_index], absmax[i / kAdamW8bitBlock]);
  }
}

unsigned grid_blocks(int64_t warp_items, int sm_count) {
  const long long max_blocks = 8LL * (sm_count > 0 ? sm_count : 1);
  const long long blocks = (warp_items + kWarps - 1) / kWarps;
  return unsigned(blocks < max_blocks ? (blocks > 0 ? blocks : 1) : max_blocks);
}

}  // namespace

cudaError_t adamw8bit_step_multi_tensor(const AdamW8bitTensor* tensors, int ntensors, int64_t total_blocks,
                                        const AdamWGroup& group, int sm_count, cudaStream_t stream) {
  QLORA_NVTX_RANGE_FN();
  if (ntensors <= 0 || total_blocks <= 0) return cudaSuccess;
  kAdamW8bitMultiTensor<<<grid_blocks(total_blocks, sm_count), kThreads, 0, stream>>>(tensors, ntensors,
                                                                                       total_blocks, group);
  return cudaGetLastError();
}

cudaError_t quantize_8bit_dynamic(const float* x, int64_t n, bool is_signed, uint8_t* codes, float* absmax,
                                  int sm_count, cudaStream_t stream) {
  QLORA_NVTX_RANGE_FN();
  if (n <= 0) return cudaSuccess;
  kQuantize8bitDynamic<<<grid_blocks(adamw8bit_blocks(n), sm_count), kThreads, 0, stream>>>(
      x, n, is_signed ? 0 : 1, codes, absmax);
  return cudaGetLastError();
}

cudaError_t dequantize_8bit_dynamic(const uint8_t* codes, const float* absmax, int64_t n, bool is_signed, float* out,
                                    int sm_count, cudaStream_t stream) {
  QLORA_NVTX_RANGE_FN();
  if (n <= 0) return cudaSuccess;
  kDequantize8bitDynamic<<<grid_blocks(adamw8bit_blocks(n) * kWarps, sm_count), kThreads, 0, stream>>>(
      codes, absmax, n, is_signed ? 0 : 1, out);
  return cudaGetLastError();
}

}  // namespace qlora::cuda
