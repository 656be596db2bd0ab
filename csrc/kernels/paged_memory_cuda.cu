// Managed-memory arenas for paged optimizer states: allocation with live-byte accounting, and prefetches
// to the GPU or the CPU on a stream.
#include <atomic>

#include "cuda_utils.h"
#include "paged_memory_cuda.h"

namespace qlora::cuda {
namespace {
std::atomic<int64_t> g_live_bytes{0};
}  // namespace

cudaError_t managed_alloc(void** ptr, size_t bytes) {
  QLORA_NVTX_RANGE_FN();
  *ptr = nullptr;
  if (bytes == 0) return cudaSuccess;
  QLORA_CUDA_RETURN_IF_ERROR(cudaMallocManaged(ptr, bytes, cudaMemAttachGlobal));
  g_live_bytes += int64_t(bytes);
  return cudaSuccess;
}

cudaError_t managed_free(void* ptr, size_t bytes) {
  QLORA_NVTX_RANGE_FN();
  if (ptr == nullptr) return cudaSuccess;
  const cudaError_t err = cudaFree(ptr);
  g_live_bytes -= int64_t(bytes);
  return err;
}

int64_t managed_live_bytes() { return g_live_bytes.load(); }

cudaError_t managed_prefetch_supported(int device, bool* supported) {
  int value = 0;
  QLORA_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&value, cudaDevAttrConcurrentManagedAccess, device));
  *supported = value != 0;
  return cudaSuccess;
}

cudaError_t managed_prefetch(const void* ptr, size_t bytes, int device, cudaStream_t stream) {
  QLORA_NVTX_RANGE_FN();
  if (ptr == nullptr || bytes == 0) return cudaSuccess;
  cudaMemLocation where{};
  if (device >= 0) {
    where.type = cudaMemLocationTypeDevice;
    where.id = device;
  } else {
    where.type = cudaMemLocationTypeHost;  // id is ignored
    where.id = 0;
  }
  return cudaMemPrefetchAsync(ptr, bytes, where, 0, stream);
}

cudaError_t managed_last_prefetch_location(const void* ptr, size_t bytes, int* location) {
  int type = 0, id = 0;
  QLORA_CUDA_RETURN_IF_ERROR(cudaMemRangeGetAttribute(&type, sizeof(type), cudaMemRangeAttributeLastPrefetchLocationType,
                                                      ptr, bytes));
  QLORA_CUDA_RETURN_IF_ERROR(cudaMemRangeGetAttribute(&id, sizeof(id), cudaMemRangeAttributeLastPrefetchLocationId,
                                                      ptr, bytes));
  if (type == cudaMemLocationTypeDevice) {
    *location = id;
  } else if (type == cudaMemLocationTypeHost || type == cudaMemLocationTypeHostNuma ||
             type == cudaMemLocationTypeHostNumaCurrent) {
    *location = -1;
  } else {
    *location = -2;
  }
  return cudaSuccess;
}

}  // namespace qlora::cuda
