// The "tune" backend's memory: for each problem class (device, dtype, direction, N, K, M rounded up to a power
// of two, weight format, the set of candidates) the implementation that was fastest when the class was first
// seen, measured on the caller's stream with CUDA events (like cudnn.benchmark), each timed run after a device
// spin (so launch overhead stays out) and an L2 flush (so the weight comes from device memory, as in a model).
// Used by linear_4bit_cuda_ops.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace qlora::ops {

// Index of the fastest of `n` candidates for `key`: from the cache, or measured now (each candidate run once to warm
// up, then three timed runs on the current CUDA stream, each after a ~1 ms device spin and an L2 flush (skipped when
// its buffer does not fit in free memory), the minimum counts; the stream is synchronized, once per key). `run(i)`
// launches candidate i and returns its output; `name(i)` is what the cache reports (asked only when measuring, so a
// cached call builds nothing). Returns -1 without measuring while the current stream is capturing a CUDA graph (the
// caller then takes its default). A candidate other than the first that throws while measured is left out, unless it
// left a fault on the device: that is raised, naming the candidate. So is one whose warm-up output differs from the
// first candidate's (the reference: dequantize + cuBLAS) by more than kTuneMaxRelativeError in relative Frobenius
// norm, or is not finite, with a warning naming it: a fast wrong kernel is never chosen.
constexpr double kTuneMaxRelativeError = 0.02;  // bf16/fp16 rounding of the same sums differs by ~0.1-0.5%

int tuned_choice(const std::string& key, int n, const std::function<at::Tensor(int)>& run,
                 const std::function<std::string(int)>& name);

// The cache as (key, chosen candidate's name, its time in microseconds) for reports; and emptied.
std::vector<std::pair<std::string, std::pair<std::string, double>>> tuning_cache();
void clear_tuning_cache();

}  // namespace qlora::ops
