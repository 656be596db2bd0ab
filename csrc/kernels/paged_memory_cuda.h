// Managed ("paged") memory for optimizer states (torch-free): one cudaMallocManaged arena per optimizer,
// migrated between GPU and CPU by stream-ordered prefetches (CUDA 13 signatures, with cudaMemLocation).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace qlora::cuda {

// bytes of managed memory attached globally (any stream may use it), for the current device.
cudaError_t managed_alloc(void** ptr, size_t bytes);
// Frees an allocation of managed_alloc (cudaFree waits for the device's pending work). Returns the error.
cudaError_t managed_free(void* ptr, size_t bytes);
// Bytes allocated by managed_alloc and not yet freed, in this process (tests check that optimizers free).
int64_t managed_live_bytes();

// Whether `device` can access managed memory concurrently with the CPU (then prefetches are worth issuing;
// without it, pages migrate on demand and prefetches are skipped).
cudaError_t managed_prefetch_supported(int device, bool* supported);

// Enqueues the migration of [ptr, ptr + bytes) to GPU `device` (device >= 0) or to the CPU (device < 0) on
// `stream`. Does not synchronize.
cudaError_t managed_prefetch(const void* ptr, size_t bytes, int device, cudaStream_t stream);

// Where the range was last prefetched: a device index, -1 for the CPU, -2 if never prefetched.
cudaError_t managed_last_prefetch_location(const void* ptr, size_t bytes, int* location);

}  // namespace qlora::cuda
