// Launchers of the CUDA kernels for 4-bit blockwise quantization and FP8 double quantization.
// Torch-free: raw device pointers and a stream; each returns the first CUDA error (launch included).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "numeric_core.h"

namespace qlora::cuda {

// x: numel elements of fmt (16-byte aligned). codes: packed_bytes(numel) bytes; absmax: num_blocks floats;
// nonfinite_count: one int32, zeroed by the caller, incremented by the number of non-finite elements.
cudaError_t quantize_4bit(const void* x, FloatFormat fmt, int64_t numel, int blocksize, const CodeBook& cb,
                          uint8_t* codes, float* absmax, int32_t* nonfinite_count, cudaStream_t stream);

// out: numel elements of fmt (16-byte aligned); codes 4-byte aligned.
cudaError_t dequantize_4bit(const uint8_t* codes, const AbsmaxSource& absmax, int64_t numel, int blocksize,
                            const CodeBook& cb, void* out, FloatFormat fmt, cudaStream_t stream);

// Double quantization of nblocks fp32 absmax: codes [nblocks] (E4M3), chunk_scale [num_chunks], mean [1].
// chunk_sums is scratch space of num_chunks doubles. Summation order as in quantize_cpu.h.
cudaError_t quantize_absmax_fp8(const float* absmax, int64_t nblocks, uint8_t* codes, float* chunk_scale,
                                float* mean, double* chunk_sums, cudaStream_t stream);

cudaError_t dequantize_absmax_fp8(const uint8_t* codes, const float* chunk_scale, const float* mean,
                                  int64_t nblocks, float* out, cudaStream_t stream);

}  // namespace qlora::cuda
