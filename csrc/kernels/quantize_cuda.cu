// CUDA kernels for 4-bit blockwise quantization (NF4/FP4/INT4) and FP8 double quantization.
//
// Quantize: each thread owns 8 consecutive elements (one 16-byte load of bf16/fp16), so a first-level
// block of `blocksize` elements is owned by GROUP = blocksize/8 adjacent lanes of one warp, which find
// its absmax with a shuffle reduction and then each write 4 packed bytes. Dequantize: each thread reads
// 4 packed bytes and writes 8 outputs (16 bytes of bf16). The arithmetic is numeric_core.h's, so the
// results are bit-identical to the CPU kernels.
#include "cuda_utils.h"
#include "quantize_cuda.h"

namespace qlora::cuda {
namespace {

constexpr int kThreads = 256;
constexpr unsigned kFullMask = 0xFFFFFFFFu;

template <FloatFormat F>
struct Elem;
template <>
struct Elem<FloatFormat::F32> {
  using Raw = float;
  static __device__ float to_f32(float v) { return v; }
  static __device__ float from_f32(float v) { return v; }
};
template <>
struct Elem<FloatFormat::F16> {
  using Raw = uint16_t;
  static __device__ float to_f32(uint16_t v) { return __half2float(__ushort_as_half(v)); }
  static __device__ uint16_t from_f32(float v) { return __half_as_ushort(__float2half_rn(v)); }
};
template <>
struct Elem<FloatFormat::BF16> {
  using Raw = uint16_t;
  static __device__ float to_f32(uint16_t v) { return __uint_as_float(uint32_t(v) << 16); }
  static __device__ uint16_t from_f32(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
};

// Copies the code book into shared memory (it is indexed by data-dependent codes).
__device__ void load_codebook(const CodeBook& src, CodeBook* dst) {
  constexpr int kWords = sizeof(CodeBook) / 4;
  static_assert(sizeof(CodeBook) % 4 == 0, "CodeBook must be a whole number of words");
  const uint32_t* s = reinterpret_cast<const uint32_t*>(&src);
  uint32_t* d = reinterpret_cast<uint32_t*>(dst);
  for (int i = threadIdx.x; i < kWords; i += blockDim.x) d[i] = s[i];
  __syncthreads();
}

// Loads 8 elements starting at e as float; elements at or past numel read as 0.
template <FloatFormat F>
__device__ void load8(const typename Elem<F>::Raw* x, int64_t e, int64_t numel, float (&v)[8]) {
  using Raw = typename Elem<F>::Raw;
  if (e + 8 <= numel) {
    constexpr int kVec = sizeof(Raw) * 8 / 16;  // 16-byte vectors: 1 for 16-bit types, 2 for fp32
    Raw r[8];
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      reinterpret_cast<uint4*>(r)[k] = reinterpret_cast<const uint4*>(x + e)[k];
    }
#pragma unroll
    for (int k = 0; k < 8; ++k) v[k] = Elem<F>::to_f32(r[k]);
  } else {
#pragma unroll
    for (int k = 0; k < 8; ++k) v[k] = e + k < numel ? Elem<F>::to_f32(x[e + k]) : 0.0f;
  }
}

template <FloatFormat F, int GROUP>
__global__ void __launch_bounds__(kThreads) quantize_4bit_kernel(const typename Elem<F>::Raw* __restrict__ x,
                                                                 int64_t numel, CodeBook cb_param,
                                                                 uint8_t* __restrict__ codes,
                                                                 float* __restrict__ absmax,
                                                                 int32_t* __restrict__ nonfinite_count) {
  __shared__ CodeBook cb;
  load_codebook(cb_param, &cb);
  const int lane = threadIdx.x & 31;
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  int nonfinite = 0;
  // The loop bound is tested on the warp's first group so whole warps stay together for the shuffles.
  for (int64_t g_warp = int64_t(blockIdx.x) * kThreads + (threadIdx.x & ~31); g_warp * 8 < numel;
       g_warp += stride) {
    const int64_t e = (g_warp + lane) * 8;
    float v[8];
    load8<F>(x, e, numel, v);
    float amax = 0.0f;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const float a = fabsf(v[k]);
      nonfinite += !(a <= 3.4028234663852886e38f);
      amax = a > amax ? a : amax;
    }
#pragma unroll
    for (int offset = GROUP / 2; offset > 0; offset /= 2) {
      const float other = __shfl_xor_sync(kFullMask, amax, offset);
      amax = other > amax ? other : amax;
    }
    if (e >= numel) continue;  // no shuffles below
    if ((lane & (GROUP - 1)) == 0) absmax[e / (GROUP * 8)] = amax;  // GROUP * 8 == blocksize
    const float pre = absmax_prescale(amax), inv = block_inverse(amax);
    uint32_t word = 0;
#pragma unroll
    for (int k = 0; k < 8; k += 2) {
      const uint32_t c0 = e + k < numel ? encode_4bit(normalise(v[k], pre, inv), cb) : 0u;
      const uint32_t c1 = e + k + 1 < numel ? encode_4bit(normalise(v[k + 1], pre, inv), cb) : 0u;
      word |= uint32_t(pack_pair(c0, c1)) << (4 * k);  // byte k/2 of the little-endian word
    }
    if (e + 8 <= numel) {
      *reinterpret_cast<uint32_t*>(codes + e / 2) = word;
    } else {
      for (int k = 0; 2 * k < numel - e; ++k) codes[e / 2 + k] = uint8_t(word >> (8 * k));
    }
  }
  nonfinite = __reduce_add_sync(kFullMask, nonfinite);
  if (lane == 0 && nonfinite != 0) atomicAdd(nonfinite_count, nonfinite);
}

template <FloatFormat F, bool kDoubleQuant>
__global__ void __launch_bounds__(kThreads) dequantize_4bit_kernel(const uint8_t* __restrict__ codes,
                                                                   AbsmaxSource am, int64_t numel, int block_shift,
                                                                   CodeBook cb_param,
                                                                   typename Elem<F>::Raw* __restrict__ out) {
  using Raw = typename Elem<F>::Raw;
  __shared__ float table[16];
  if (threadIdx.x < 16) table[threadIdx.x] = cb_param.value[threadIdx.x];
  __syncthreads();
  const float mean = kDoubleQuant ? *am.mean : 0.0f;
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  for (int64_t g = int64_t(blockIdx.x) * kThreads + threadIdx.x; g * 8 < numel; g += stride) {
    const int64_t e = g * 8;
    const int64_t block = e >> block_shift;  // blocksize is a power of two: no 64-bit division
    const float amax = kDoubleQuant ? decode_absmax(am.fp8[block], am.chunk_scale[block / kAbsmaxChunk], mean)
                                    : am.f32[block];
    if (e + 8 <= numel) {
      const uint32_t word = *reinterpret_cast<const uint32_t*>(codes + e / 2);
      Raw r[8];
#pragma unroll
      for (int k = 0; k < 8; k += 2) {
        const uint32_t byte = (word >> (4 * k)) & 0xFFu;
        r[k] = Elem<F>::from_f32(mul_rn(table[byte >> 4], amax));
        r[k + 1] = Elem<F>::from_f32(mul_rn(table[byte & 0xFu], amax));
      }
      constexpr int kVec = sizeof(Raw) * 8 / 16;
#pragma unroll
      for (int k = 0; k < kVec; ++k) reinterpret_cast<uint4*>(out + e)[k] = reinterpret_cast<const uint4*>(r)[k];
    } else {
      for (int64_t i = e; i < numel; ++i) {
        const uint8_t byte = codes[i / 2];
        out[i] = Elem<F>::from_f32(mul_rn(table[(i & 1) ? (byte & 0xFu) : (byte >> 4)], amax));
      }
    }
  }
}

// ---- double quantization (summation order documented in quantize_cpu.h) ---------------------------
__global__ void __launch_bounds__(kAbsmaxChunk) absmax_chunk_sums_kernel(const float* __restrict__ absmax,
                                                                         int64_t nblocks,
                                                                         double* __restrict__ chunk_sums) {
  __shared__ double v[kAbsmaxChunk];
  const int t = threadIdx.x;
  const int64_t i = int64_t(blockIdx.x) * kAbsmaxChunk + t;
  v[t] = i < nblocks ? double(absmax[i]) : 0.0;
  __syncthreads();
  for (int stride = kAbsmaxChunk / 2; stride > 0; stride /= 2) {
    if (t < stride) v[t] += v[t + stride];
    __syncthreads();
  }
  if (t == 0) chunk_sums[blockIdx.x] = v[0];
}

__global__ void __launch_bounds__(kMeanLanes) absmax_mean_kernel(const double* __restrict__ chunk_sums,
                                                                 int64_t nchunks, int64_t nblocks,
                                                                 float* __restrict__ mean) {
  __shared__ double v[kMeanLanes];
  const int t = threadIdx.x;
  double acc = 0.0;
  for (int64_t i = t; i < nchunks; i += kMeanLanes) acc += chunk_sums[i];
  v[t] = acc;
  __syncthreads();
  for (int stride = kMeanLanes / 2; stride > 0; stride /= 2) {
    if (t < stride) v[t] += v[t + stride];
    __syncthreads();
  }
  if (t == 0) *mean = float(v[0] / double(nblocks));
}

__global__ void __launch_bounds__(kAbsmaxChunk) absmax_encode_kernel(const float* __restrict__ absmax,
                                                                     int64_t nblocks,
                                                                     const float* __restrict__ mean_ptr,
                                                                     uint8_t* __restrict__ codes,
                                                                     float* __restrict__ chunk_scale_out) {
  __shared__ float warp_max[kAbsmaxChunk / 32];
  const int t = threadIdx.x;
  const int64_t i = int64_t(blockIdx.x) * kAbsmaxChunk + t;
  const float mean = *mean_ptr;
  const float a = i < nblocks ? absmax[i] : 0.0f;
  float dev = i < nblocks ? fabsf(sub_rn(a, mean)) : 0.0f;
  for (int offset = 16; offset > 0; offset /= 2) dev = fmaxf(dev, __shfl_xor_sync(kFullMask, dev, offset));
  if ((t & 31) == 0) warp_max[t / 32] = dev;
  __syncthreads();
  float max_dev = 0.0f;
#pragma unroll
  for (int w = 0; w < kAbsmaxChunk / 32; ++w) max_dev = fmaxf(max_dev, warp_max[w]);
  const float scale = chunk_scale(max_dev);
  if (t == 0) chunk_scale_out[blockIdx.x] = scale;
  if (i < nblocks) codes[i] = encode_absmax(a, scale, mean);
}

__global__ void absmax_decode_kernel(const uint8_t* __restrict__ codes, const float* __restrict__ chunk_scale,
                                     const float* __restrict__ mean_ptr, int64_t nblocks, float* __restrict__ out) {
  const float mean = *mean_ptr;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < nblocks; i += int64_t(gridDim.x) * blockDim.x) {
    out[i] = decode_absmax(codes[i], chunk_scale[i / kAbsmaxChunk], mean);
  }
}

template <FloatFormat F>
cudaError_t launch_quantize(const void* x, int64_t numel, int blocksize, const CodeBook& cb, uint8_t* codes,
                            float* absmax, int32_t* nonfinite_count, cudaStream_t stream) {
  using Raw = typename Elem<F>::Raw;
  const unsigned grid = grid_for((numel + 7) / 8, kThreads);
  const Raw* xr = static_cast<const Raw*>(x);
  switch (blocksize) {
    case 64:
      quantize_4bit_kernel<F, 8><<<grid, kThreads, 0, stream>>>(xr, numel, cb, codes, absmax, nonfinite_count);
      break;
    case 128:
      quantize_4bit_kernel<F, 16><<<grid, kThreads, 0, stream>>>(xr, numel, cb, codes, absmax, nonfinite_count);
      break;
    case 256:
      quantize_4bit_kernel<F, 32><<<grid, kThreads, 0, stream>>>(xr, numel, cb, codes, absmax, nonfinite_count);
      break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template <FloatFormat F>
cudaError_t launch_dequantize(const uint8_t* codes, const AbsmaxSource& am, int64_t numel, int blocksize,
                              const CodeBook& cb, void* out, cudaStream_t stream) {
  using Raw = typename Elem<F>::Raw;
  const unsigned grid = grid_for((numel + 7) / 8, kThreads);
  Raw* o = static_cast<Raw*>(out);
  const int block_shift = __builtin_ctz(unsigned(blocksize));
  if (am.f32) {
    dequantize_4bit_kernel<F, false><<<grid, kThreads, 0, stream>>>(codes, am, numel, block_shift, cb, o);
  } else {
    dequantize_4bit_kernel<F, true><<<grid, kThreads, 0, stream>>>(codes, am, numel, block_shift, cb, o);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t quantize_4bit(const void* x, FloatFormat fmt, int64_t numel, int blocksize, const CodeBook& cb,
                          uint8_t* codes, float* absmax, int32_t* nonfinite_count, cudaStream_t stream) {
  QLORA_NVTX_RANGE_FN();
  if (numel == 0) return cudaSuccess;
  switch (fmt) {
    case FloatFormat::F16: return launch_quantize<FloatFormat::F16>(x, numel, blocksize, cb, codes, absmax, nonfinite_count, stream);
    case FloatFormat::BF16: return launch_quantize<FloatFormat::BF16>(x, numel, blocksize, cb, codes, absmax, nonfinite_count, stream);
    default: return launch_quantize<FloatFormat::F32>(x, numel, blocksize, cb, codes, absmax, nonfinite_count, stream);
  }
}

cudaError_t dequantize_4bit(const uint8_t* codes, const AbsmaxSource& absmax, int64_t numel, int blocksize,
                            const CodeBook& cb, void* out, FloatFormat fmt, cudaStream_t stream) {
  QLORA_NVTX_RANGE_FN();
  if (numel == 0) return cudaSuccess;
  switch (fmt) {
    case FloatFormat::F16: return launch_dequantize<FloatFormat::F16>(codes, absmax, numel, blocksize, cb, out, stream);
    case FloatFormat::BF16: return launch_dequantize<FloatFormat::BF16>(codes, absmax, numel, blocksize, cb, out, stream);
    default: return launch_dequantize<FloatFormat::F32>(codes, absmax, numel, blocksize, cb, out, stream);
  }
}

cudaError_t quantize_absmax_fp8(const float* absmax, int64_t nblocks, uint8_t* codes, float* chunk_scale,
                                float* mean, double* chunk_sums, cudaStream_t stream) {
  QLORA_NVTX_RANGE_FN();
  if (nblocks == 0) return cudaSuccess;
  const int64_t nchunks = num_chunks(nblocks);
  absmax_chunk_sums_kernel<<<unsigned(nchunks), kAbsmaxChunk, 0, stream>>>(absmax, nblocks, chunk_sums);
  QLORA_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  absmax_mean_kernel<<<1, kMeanLanes, 0, stream>>>(chunk_sums, nchunks, nblocks, mean);
  QLORA_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  absmax_encode_kernel<<<unsigned(nchunks), kAbsmaxChunk, 0, stream>>>(absmax, nblocks, mean, codes, chunk_scale);
  return cudaGetLastError();
}

cudaError_t dequantize_absmax_fp8(const uint8_t* codes, const float* chunk_scale, const float* mean,
                                  int64_t nblocks, float* out, cudaStream_t stream) {
  QLORA_NVTX_RANGE_FN();
  if (nblocks == 0) return cudaSuccess;
  absmax_decode_kernel<<<grid_for(nblocks, kThreads), kThreads, 0, stream>>>(codes, chunk_scale, mean, nblocks, out);
  return cudaGetLastError();
}

}  // namespace qlora::cuda
