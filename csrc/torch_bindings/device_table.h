// Per-launch tables of multi-tensor kernels (one struct per tensor) sent to the GPU without a host sync,
// shared by the optimizer ops.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>

#include <cstring>
#include <vector>

namespace qlora::ops {

// A device copy of `entries` on `device`, through pinned memory on the current stream: copy_ with non_blocking
// records an event on the pinned block, so the caching host allocator does not reuse it before the copy runs.
// Keep the returned tensor alive until the launch that reads it is enqueued.
template <typename T>
at::Tensor upload_table(const std::vector<T>& entries, const c10::Device& device) {
  const int64_t bytes = int64_t(entries.size() * sizeof(T));
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), entries.data(), size_t(bytes));
  return host.to(device, at::kByte, /*non_blocking=*/true);
}

inline int current_sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

}  // namespace qlora::ops
