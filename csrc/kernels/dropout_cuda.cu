// CUDA dropout: one thread per Philox group (four words, four elements). Sixteen consecutive threads serve
// one 64-element batch, so for each word they store 16 consecutive elements. The words and the per-element
// arithmetic are dropout_core.h's, shared with the CPU kernel: both drop and scale the same elements.
#include "cuda_utils.h"
#include "dropout_cuda.h"

namespace qlora::cuda {
namespace {

constexpr int kThreads = 256;

template <DropoutDtype T>
__global__ void kDropout(const void* __restrict__ x, void* __restrict__ y, int64_t numel, int64_t groups,
                         DropoutParams d) {
  const uint64_t seed = d.seed_on_device != nullptr ? uint64_t(__ldg(d.seed_on_device)) : d.seed;
  for (int64_t g = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
       g += int64_t(gridDim.x) * blockDim.x) {
    const Philox4 r = dropout_words(seed, uint64_t(g));
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const int64_t i = dropout_element_index(g, w);
      if (i < numel) dropout_element(x, y, i, T, d, r.v[w]);
    }
  }
}

template <DropoutDtype T>
cudaError_t launch(const void* x, void* y, int64_t numel, const DropoutParams& d, cudaStream_t stream) {
  const int64_t groups = dropout_num_groups(numel);
  kDropout<T><<<grid_for(groups, kThreads), kThreads, 0, stream>>>(x, y, numel, groups, d);
  return cudaGetLastError();
}

}  // namespace

cudaError_t dropout(const void* x, void* y, int64_t numel, DropoutDtype dtype, const DropoutParams& d,
                    cudaStream_t stream) {
  QLORA_NVTX_RANGE_FN();
  if (numel == 0) return cudaSuccess;
  switch (dtype) {
    case DropoutDtype::F32: return launch<DropoutDtype::F32>(x, y, numel, d, stream);
    case DropoutDtype::F64: return launch<DropoutDtype::F64>(x, y, numel, d, stream);
    case DropoutDtype::F16: return launch<DropoutDtype::F16>(x, y, numel, d, stream);
    case DropoutDtype::BF16: return launch<DropoutDtype::BF16>(x, y, numel, d, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace qlora::cuda
