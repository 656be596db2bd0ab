// Launch facts the fused GEMMs' launchers need on every call (a decode step calls them twice per layer), asked of
// the CUDA runtime once per kernel and device and remembered: how many CTAs of a kernel one SM holds, and the
// opt-in to more than 48 KiB of dynamic shared memory. Host code, torch-free.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <map>
#include <mutex>
#include <set>
#include <tuple>

namespace qlora::cuda {

// At least 1 (also when the runtime cannot answer: the caller then sizes for one CTA per SM). Kernels with more
// than 48 KiB of dynamic shared memory must have their attribute set before the first call.
inline int ctas_per_sm(const void* kernel, int threads, size_t dynamic_smem) {
  static std::mutex mutex;
  static std::map<std::tuple<const void*, int, int, size_t>, int> cache;
  int device = -1;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();
    device = -1;
  }
  const auto key = std::make_tuple(kernel, device, threads, dynamic_smem);
  const std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(key);
  if (it == cache.end()) {
    int ctas = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas, kernel, threads, dynamic_smem) != cudaSuccess ||
        ctas < 1) {
      cudaGetLastError();
      ctas = 1;
    }
    it = cache.emplace(key, ctas).first;
  }
  return it->second;
}

// cudaFuncSetAttribute(kernel, MaxDynamicSharedMemorySize, bytes) once per (kernel, device, bytes); the first
// error is returned (and asked again next time).
inline cudaError_t allow_dynamic_smem(const void* kernel, int bytes) {
  static std::mutex mutex;
  static std::set<std::tuple<const void*, int, int>> done;
  int device = -1;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();
    device = -1;
  }
  const auto key = std::make_tuple(kernel, device, bytes);
  const std::lock_guard<std::mutex> lock(mutex);
  if (done.count(key)) return cudaSuccess;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess) done.insert(key);
  return err;
}

}  // namespace qlora::cuda
