// Small torch-free CUDA helpers: launch checking and an RAII NVTX range so that an nsys timeline
// names every launcher.
#pragma once

#include <cuda_runtime_api.h>
#include <nvtx3/nvToolsExt.h>

namespace qlora::cuda {

// Returns early from a launcher with the first CUDA error (bindings turn it into a Python exception).
#define QLORA_CUDA_RETURN_IF_ERROR(expr)   \
  do {                                     \
    const cudaError_t err_ = (expr);       \
    if (err_ != cudaSuccess) return err_;  \
  } while (0)

class NvtxRange {
 public:
  explicit NvtxRange(const char* name) { nvtxRangePushA(name); }
  ~NvtxRange() { nvtxRangePop(); }
  NvtxRange(const NvtxRange&) = delete;
  NvtxRange& operator=(const NvtxRange&) = delete;
};

#define QLORA_NVTX_RANGE_FN() ::qlora::cuda::NvtxRange qlora_nvtx_range_(__func__)

// Enough blocks of `threads` for `work_items` items, capped for grid-stride loops.
inline unsigned grid_for(long long work_items, int threads, long long max_blocks = 1 << 16) {
  long long blocks = (work_items + threads - 1) / threads;
  if (blocks < 1) blocks = 1;
  return static_cast<unsigned>(blocks < max_blocks ? blocks : max_blocks);
}

}  // namespace qlora::cuda
