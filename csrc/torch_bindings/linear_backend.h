// Which CUDA implementation linear_4bit uses: a process-wide switch, set from Python with
// qlora_ext.set_linear_backend(). "auto" is the dispatcher's choice by shape; "fused" forces the fused
// kernels where they apply (bf16/fp16, blocksize 64: small-M kernels for M <= 64, large-M kernels above: wgmma
// on Hopper when the build has sm_90a, mma.sync otherwise); "fused_mma" is "fused" with the mma.sync large-M
// kernels everywhere (to test and measure them on Hopper); "dequant" forces dequantize + cuBLAS; "tune" measures
// dequantize + cuBLAS and every fused kernel that applies the first time a class of problem is seen (same
// dtype, direction, N, K, M up to the same power of two) and keeps the fastest (linear_autotune_cuda.h).
#pragma once

#include <cstdint>
#include <string>

namespace qlora::ops {

enum class LinearBackend : int { Auto = 0, Fused = 1, FusedMma = 2, Dequant = 3, Tune = 4 };

LinearBackend linear_backend();
void set_linear_backend(const std::string& name);
std::string linear_backend_name();

// The Hopper large-M kernels' tile width (output columns per CTA): 0 = their own choice by shape, or 128 / 256
// (set_hopper_tile_n; for tests and benchmarks that compare the two).
int hopper_tile_n();
void set_hopper_tile_n(int64_t tile_n);

// How the fused kernels split their reduction when the output has too few tiles (split::SplitMode in
// linear_4bit_split.h): "auto" (0: small M among a CTA's warps, and over the grid where that fills under half
// a wave; large M split-K over the grid where the tiles fill under a wave), "cta" (1: never over the grid,
// always one launch) or "grid" (2: small M over the grid only, partial sums + a reduce kernel; large M as
// "auto"). set_fused_split, for tests and benchmarks that compare them.
int fused_split();
std::string fused_split_name();
void set_fused_split(const std::string& mode);

#if defined(QLORA_WITH_CUDA)
// The large-M kernel that "fused" runs on CUDA device `device`: "wgmma" or "mma.sync" (linear_4bit_cuda_ops.cpp).
std::string fused_large_kernel(int64_t device);
#endif

}  // namespace qlora::ops
