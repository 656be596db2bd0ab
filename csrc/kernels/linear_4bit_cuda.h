// Launchers of the fused 4-bit GEMM kernels: small M (decode and small batches, linear_4bit_cuda.cu) decodes
// the weight from its packed codes straight into tensor-core fragments; large M (training) decodes 64 x 128
// weight tiles into shared memory, for mma.sync (linear_4bit_large_cuda.cu, sm_80+) or wgmma
// (linear_4bit_hopper_cuda.cu, sm_90a). In all the dense W never touches global memory. Torch-free: raw
// pointers and a stream; each returns the first CUDA error.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "numeric_core.h"

namespace qlora::cuda {

// The largest M the small-M kernels take (four 16-row tensor-core tiles).
constexpr int64_t kFusedMaxM = 64;

struct Linear4bitProblem {
  int64_t m = 0, n = 0, k = 0;   // x [m, k], W [n, k] (k a multiple of 64), y [m, n]
  int blocksize = 64;            // must be 64 for these kernels
  bool bf16 = true;              // activations bf16 (true) or fp16 (false)
  const uint8_t* codes = nullptr;
  AbsmaxSource absmax;
  CodeBook codebook;
  int split_mode = 0;            // small-M kernels: which splits they may use (split::SplitMode; 0 = Auto)
};

// Bytes of fp32 scratch space the launchers need (split-K partial sums), for the given problem.
int64_t fused_forward_workspace_bytes(const Linear4bitProblem& p, int num_sms);
int64_t fused_grad_input_workspace_bytes(const Linear4bitProblem& p, int num_sms);

// y [m, n] = x [m, k] @ W^T (+ bias [n]); x, y, bias in the activation dtype, 16-byte aligned x.
cudaError_t fused_linear_forward(const Linear4bitProblem& p, const void* x, const void* bias, void* y,
                                 float* workspace, int num_sms, cudaStream_t stream);

// dx [m, k] = dy [m, n] @ W.
cudaError_t fused_linear_grad_input(const Linear4bitProblem& p, const void* dy, void* dx, float* workspace,
                                    int num_sms, cudaStream_t stream);

// Adds `splits` fp32 partial sums [splits, rows, cols] in the order s = 0, 1, ... (deterministic), adds bias
// [cols] (or none), rounds once into out [rows, cols] (bf16 or fp16): the second kernel of every grid split.
cudaError_t reduce_split_partials(const float* partial, int64_t splits, int64_t rows, int64_t cols, const void* bias,
                                  void* out, bool bf16, cudaStream_t stream);

// Large M (the kernels take any M >= 1; the binding uses them for M > kFusedMaxM): 128 x 128 output tiles;
// where they are too few for the GPU, split-K over blockIdx.z into `workspace` (linear_4bit_split.h), of
// fused_large_workspace_bytes. x [m, k] contiguous and 16-byte aligned; codes 16-byte aligned; y [m, n], bias
// [n] or null.
int64_t fused_large_workspace_bytes(const Linear4bitProblem& p, bool grad, int num_sms);
cudaError_t fused_large_linear_forward(const Linear4bitProblem& p, const void* x, const void* bias, void* y,
                                       float* workspace, int num_sms, cudaStream_t stream);

// dx [m, k] = dy [m, n] @ W; dy contiguous (any alignment: rows that are not 16-byte aligned, e.g. odd n, take
// a slower plain-load path).
cudaError_t fused_large_linear_grad_input(const Linear4bitProblem& p, const void* dy, void* dx, float* workspace,
                                          int num_sms, cudaStream_t stream);

// Hopper (wgmma) versions of the two large-M kernels, same contracts. Available when `device` has compute
// capability 9.0 and the image loaded for it has sm_90a features: asked once per device by a probe kernel on
// `stream` (synchronized that once; not while `stream` is capturing a CUDA graph, when the answer is "no"
// until a later call can ask).
bool hopper_gemm_available(int device, cudaStream_t stream);
// tile_n: output columns per CTA, 128 or 256 (one CTA per SM, half the activation traffic per flop), or 0 for
// the launchers' choice (hopper_tile_n: 256 when the output has more than 128 columns).
int hopper_tile_n(const Linear4bitProblem& p, bool grad, int tile_n);
int64_t hopper_workspace_bytes(const Linear4bitProblem& p, bool grad, int tile_n, int num_sms);
cudaError_t hopper_linear_forward(const Linear4bitProblem& p, const void* x, const void* bias, void* y, int tile_n,
                                  float* workspace, int num_sms, cudaStream_t stream);
cudaError_t hopper_linear_grad_input(const Linear4bitProblem& p, const void* dy, void* dx, int tile_n,
                                     float* workspace, int num_sms, cudaStream_t stream);

}  // namespace qlora::cuda
