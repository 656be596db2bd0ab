// The on-disk/in-memory format of 4-bit blockwise quantization: one place for every constant.
// Torch-free; included by the CPU kernels, the CUDA kernels and the bindings alike.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define QLORA_HD __host__ __device__ __forceinline__
#else
#define QLORA_HD inline
#endif

namespace qlora {

// Which 16-entry code table a packed tensor uses.
enum class QuantType : int32_t { NF4 = 0, FP4 = 1, INT4 = 2 };

// The element type of a dense tensor, handled as raw bits by the torch-free kernels.
enum class FloatFormat : int32_t { F32 = 0, F16 = 1, BF16 = 2 };

// Where each first-level block's absmax comes from when dequantizing: fp32 values, or (double
// quantization) FP8 codes with one fp32 scale per chunk of 256 and one fp32 mean.
struct AbsmaxSource {
  const float* f32 = nullptr;          // [nblocks], null when double quantized
  const uint8_t* fp8 = nullptr;        // [nblocks] E4M3 codes
  const float* chunk_scale = nullptr;  // [num_chunks(nblocks)]
  const float* mean = nullptr;         // [1]; device memory for the CUDA kernels
};

// First-level blocks: `blocksize` consecutive elements (in flat row-major order) share one absmax.
// The kernels reduce a block inside one warp with 8 elements per thread, so 64..256 are supported.
constexpr int kDefaultBlocksize = 64;
constexpr int kMinBlocksize = 64;
constexpr int kMaxBlocksize = 256;
QLORA_HD bool is_supported_blocksize(int64_t b) { return b == 64 || b == 128 || b == 256; }

// Double quantization: the first-level absmax are grouped in chunks of 256, each with one fp32 scale,
// around one fp32 mean for the whole tensor; the absmax themselves are stored as FP8 E4M3 (OCP "fn").
constexpr int kAbsmaxChunk = 256;
constexpr float kFp8E4M3Max = 448.0f;

// Threads used to fold the per-chunk partial sums into the tensor mean. CPU and CUDA both follow this
// exact summation order so that the mean (and everything after it) is bit-identical on both.
constexpr int kMeanLanes = 1024;

// Packing: element 2i goes to the HIGH nibble of byte i, element 2i+1 to the low nibble.
QLORA_HD int64_t packed_bytes(int64_t numel) { return (numel + 1) / 2; }
QLORA_HD int64_t num_blocks(int64_t numel, int64_t blocksize) { return (numel + blocksize - 1) / blocksize; }
QLORA_HD int64_t num_chunks(int64_t nblocks) { return (nblocks + kAbsmaxChunk - 1) / kAbsmaxChunk; }

// Code tables, float32, exact bit patterns (hex literals).
//
// NF4: bitsandbytes' NormalFloat4. 8 positive and 7 negative quantiles of N(0,1) taken at
// linspace(0.9677083, 0.5) and normalised to [-1, 1], as bitsandbytes computes them in float32.
// Monotonic in the code: code 7 is exactly 0.
constexpr float kNF4Table[16] = {
    -0x1.000000p+0f, -0x1.647362p-1f, -0x1.0cd660p-1f, -0x1.946540p-2f,
    -0x1.23449ap-2f, -0x1.7a6a7ep-3f, -0x1.74f0e2p-4f, 0x0.0p+0f,
    0x1.45f5fep-4f,  0x1.4995c6p-3f,  0x1.f809bap-3f,  0x1.5a0674p-2f,
    0x1.c34970p-2f,  0x1.200f56p-1f,  0x1.722766p-1f,  0x1.000000p+0f,
};

// FP4: bitsandbytes' own E2M1 variant (bias 3, subnormal 0.0625, max 12), divided by 12 in float32.
// Sign-magnitude with a non-monotonic code order: bit 3 is the sign; magnitudes by the low 3 bits are
// 0, 0.0625, 8, 12, 4, 6, 2, 3 (/12).
constexpr float kFP4Table[16] = {
    0x0.0p+0f,        0x1.555556p-8f,  0x1.555556p-1f,  0x1.000000p+0f,
    0x1.555556p-2f,   0x1.000000p-1f,  0x1.555556p-3f,  0x1.000000p-2f,
    -0x0.0p+0f,       -0x1.555556p-8f, -0x1.555556p-1f, -0x1.000000p+0f,
    -0x1.555556p-2f,  -0x1.000000p-1f, -0x1.555556p-3f, -0x1.000000p-2f,
};
// FP4 magnitudes in increasing order and the 3-bit code of each.
constexpr uint8_t kFP4RankToCode[8] = {0, 1, 6, 7, 4, 5, 2, 3};

// INT4 (the paper's ablation): symmetric, code c in 0..14 means (c - 7) / 7 in float32. Code 15 is
// never produced by the encoder; it decodes to 0 so a corrupted nibble cannot blow up a weight.
constexpr float kINT4Table[16] = {
    -0x1.000000p+0f, -0x1.b6db6ep-1f, -0x1.6db6dcp-1f, -0x1.24924ap-1f,
    -0x1.b6db6ep-2f, -0x1.24924ap-2f, -0x1.24924ap-3f, 0x0.0p+0f,
    0x1.24924ap-3f,  0x1.24924ap-2f,  0x1.b6db6ep-2f,  0x1.24924ap-1f,
    0x1.6db6dcp-1f,  0x1.b6db6ep-1f,  0x1.000000p+0f,  0x0.0p+0f,
};

inline const float* code_table(QuantType qt) {
  switch (qt) {
    case QuantType::FP4: return kFP4Table;
    case QuantType::INT4: return kINT4Table;
    default: return kNF4Table;
  }
}

}  // namespace qlora
