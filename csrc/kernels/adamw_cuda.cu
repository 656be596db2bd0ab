// CUDA kernel of the multi-tensor AdamW step. The tensors of a step are cut into chunks of 4096 elements;
// a grid-stride loop hands chunks to blocks, and a block finds its chunk's tensor by binary search in
// the (device) array of AdamWTensor, so hundreds of LoRA tensors cost one launch and no host sync.
// Each thread moves 4 elements per vector access (16-byte fp32 states, 8-byte bf16/fp16 params and
// grads) and issues its 4 accesses of each array before computing, to keep enough bytes in flight.
// The arithmetic is adamw_core.h's, rounded op by op (__fmul_rn & co.), so the bits match the CPU kernel.
#include "adamw_cuda.h"
#include "cuda_utils.h"
#include "vector_store.cuh"

namespace qlora::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = 4;     // elements per vector access
constexpr int kUnroll = 4;  // vector accesses per thread per chunk
static_assert(kThreads * kVec * kUnroll == kAdamWCudaChunk, "chunk size must match the header");

template <FloatFormat F>
struct Access;

template <>
struct Access<FloatFormat::F32> {
  static __device__ void load4(const void* x, int64_t i, float (&v)[kVec]) {
    const float4 r = *reinterpret_cast<const float4*>(static_cast<const float*>(x) + i);
    v[0] = r.x, v[1] = r.y, v[2] = r.z, v[3] = r.w;
  }
  static __device__ void store4(void* x, int64_t i, const float (&v)[kVec]) {
    store_global_v4(static_cast<float*>(x) + i, v[0], v[1], v[2], v[3]);
  }
  static __device__ float load1(const void* x, int64_t i) { return static_cast<const float*>(x)[i]; }
  static __device__ void store1(void* x, int64_t i, float v) { static_cast<float*>(x)[i] = v; }
};

// 16-bit formats: raw bits through numeric_core's round-to-nearest-even conversions.
template <FloatFormat F>
struct Access16 {
  static __device__ float to_f32(uint16_t b) {
    if constexpr (F == FloatFormat::BF16) return bf16_to_f32(b);
    return f16_to_f32(b);
  }
  static __device__ uint16_t from_f32(float v) {
    if constexpr (F == FloatFormat::BF16) return f32_to_bf16_rn(v);
    return f32_to_f16_rn(v);
  }
  static __device__ void load4(const void* x, int64_t i, float (&v)[kVec]) {
    const uint2 r = *reinterpret_cast<const uint2*>(static_cast<const uint16_t*>(x) + i);
    v[0] = to_f32(uint16_t(r.x & 0xFFFFu)), v[1] = to_f32(uint16_t(r.x >> 16));
    v[2] = to_f32(uint16_t(r.y & 0xFFFFu)), v[3] = to_f32(uint16_t(r.y >> 16));
  }
  static __device__ void store4(void* x, int64_t i, const float (&v)[kVec]) {
    store_global_v2(static_cast<uint16_t*>(x) + i, uint32_t(from_f32(v[0])) | (uint32_t(from_f32(v[1])) << 16),
                    uint32_t(from_f32(v[2])) | (uint32_t(from_f32(v[3])) << 16));
  }
  static __device__ float load1(const void* x, int64_t i) { return to_f32(static_cast<const uint16_t*>(x)[i]); }
  static __device__ void store1(void* x, int64_t i, float v) { static_cast<uint16_t*>(x)[i] = from_f32(v); }
};
template <>
struct Access<FloatFormat::BF16> : Access16<FloatFormat::BF16> {};
template <>
struct Access<FloatFormat::F16> : Access16<FloatFormat::F16> {};

// Elements [begin, end) of tensor t; begin is a multiple of kAdamWCudaChunk.
template <FloatFormat F>
__device__ void adamw_chunk(const AdamWTensor& t, const AdamWGroup& h, int64_t begin, int64_t end) {
  using A = Access<F>;
  float p[kUnroll][kVec], g[kUnroll][kVec], m[kUnroll][kVec], v[kUnroll][kVec];
  bool whole[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t e = begin + int64_t(u * kThreads + threadIdx.x) * kVec;
    whole[u] = t.vector_aligned && e + kVec <= end;
    if (whole[u]) {
      A::load4(t.param, e, p[u]);
      A::load4(t.grad, e, g[u]);
      Access<FloatFormat::F32>::load4(t.exp_avg, e, m[u]);
      Access<FloatFormat::F32>::load4(t.exp_avg_sq, e, v[u]);
    } else {
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const bool in = e + k < end;
        p[u][k] = in ? A::load1(t.param, e + k) : 0.0f;
        g[u][k] = in ? A::load1(t.grad, e + k) : 0.0f;
        m[u][k] = in ? t.exp_avg[e + k] : 0.0f;
        v[u][k] = in ? t.exp_avg_sq[e + k] : 0.0f;
      }
    }
  }
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      p[u][k] = adamw_update(p[u][k], g[u][k], m[u][k], v[u][k], h, t.neg_step_size, t.bias_correction2_sqrt);
    }
  }
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t e = begin + int64_t(u * kThreads + threadIdx.x) * kVec;
    if (whole[u]) {
      A::store4(t.param, e, p[u]);
      Access<FloatFormat::F32>::store4(t.exp_avg, e, m[u]);
      Access<FloatFormat::F32>::store4(t.exp_avg_sq, e, v[u]);
    } else {
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        if (e + k < end) {
          A::store1(t.param, e + k, p[u][k]);
          t.exp_avg[e + k] = m[u][k];
          t.exp_avg_sq[e + k] = v[u][k];
        }
      }
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    kAdamWMultiTensor(const AdamWTensor* __restrict__ tensors, int ntensors, int64_t total_chunks, AdamWGroup h) {
  for (int64_t chunk = blockIdx.x; chunk < total_chunks; chunk += gridDim.x) {
    // The last tensor whose first chunk is not after this one (every thread searches the same
    // addresses, so the loads are broadcasts from L1).
    int lo = 0, hi = ntensors - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (tensors[mid].first_chunk <= chunk) lo = mid; else hi = mid - 1;
    }
    const AdamWTensor t = tensors[lo];
    const int64_t begin = (chunk - t.first_chunk) * kAdamWCudaChunk;
    const int64_t end = min(t.numel, begin + kAdamWCudaChunk);
    switch (t.format) {
      case FloatFormat::BF16: adamw_chunk<FloatFormat::BF16>(t, h, begin, end); break;
      case FloatFormat::F16: adamw_chunk<FloatFormat::F16>(t, h, begin, end); break;
      default: adamw_chunk<FloatFormat::F32>(t, h, begin, end); break;
    }
  }
}

}  // namespace

cudaError_t adamw_step_multi_tensor(const AdamWTensor* tensors, int ntensors, int64_t total_chunks,
                                    const AdamWGroup& group, int sm_count, cudaStream_t stream) {
  QLORA_NVTX_RANGE_FN();
  if (ntensors <= 0 || total_chunks <= 0) return cudaSuccess;
  // Enough resident blocks to saturate memory bandwidth; the grid-stride loop covers the rest.
  const long long max_blocks = 8LL * (sm_count > 0 ? sm_count : 1);
  const unsigned blocks = unsigned(total_chunks < max_blocks ? total_chunks : max_blocks);
  kAdamWMultiTensor<<<blocks, kThreads, 0, stream>>>(tensors, ntensors, total_chunks, group);
  return cudaGetLastError();
}

}  // namespace qlora::cuda
