// Counter-based dropout shared by the CPU and CUDA kernels: the keep/drop decision of element i is a pure
// function of (seed, i), so the backward pass regenerates the forward's mask instead of storing it, and
// CPU and GPU drop the same elements for the same seed.
//
// Random bits: Philox4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as 1, 2, 3",
// SC'11), the generator cuRAND and PyTorch's CUDA dropout use. One call with counter (g, g >> 32, 0, 0)
// and key (seed, seed >> 32) gives the four 32-bit words of group g. Elements (in the row-major order of
// the logical shape) come in batches of 64 served by 16 groups: element 64b + 16w + l takes word w of
// group 16b + l. That order lets a CPU vector of 16 groups produce 16 consecutive elements per word and
// lets 16 consecutive CUDA threads store 16 consecutive elements. Element i is kept when its word is
// >= threshold, i.e. with probability 1 - threshold / 2^32 (threshold = round(p * 2^32)), and a kept
// element is scaled by 1 / (1 - p) in its own precision's arithmetic.
#pragma once

#include <cstdint>

#include "numeric_core.h"

namespace qlora {

// Philox4x32 round multipliers and Weyl key increments (the Random123 constants).
constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

struct Philox4 {
  uint32_t v[4];
};

QLORA_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < kPhiloxRounds; ++round) {
    if (round > 0) {  // the key is bumped between rounds, not before the first
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    const uint64_t p0 = uint64_t(kPhiloxM0) * c0;
    const uint64_t p1 = uint64_t(kPhiloxM1) * c2;
    const uint32_t n0 = uint32_t(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = uint32_t(p0 >> 32) ^ c3 ^ k1;
    c1 = uint32_t(p1);
    c3 = uint32_t(p0);
    c0 = n0;
    c2 = n2;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// The four random words of group `group`.
QLORA_HD Philox4 dropout_words(uint64_t seed, uint64_t group) {
  return philox4x32_10(uint32_t(group), uint32_t(group >> 32), 0u, 0u, uint32_t(seed), uint32_t(seed >> 32));
}

// Element order (see the top of this file): batches of kDropoutBatch elements served by kDropoutBatchGroups
// groups.
constexpr int kDropoutBatchGroups = 16;
constexpr int kDropoutBatch = 4 * kDropoutBatchGroups;

// How many groups cover numel elements (whole batches).
QLORA_HD int64_t dropout_num_groups(int64_t numel) {
  return (numel + kDropoutBatch - 1) / kDropoutBatch * kDropoutBatchGroups;
}

// The element that word w of group g decides (it may lie beyond numel in the last batch).
QLORA_HD int64_t dropout_element_index(int64_t group, int w) {
  return group / kDropoutBatchGroups * kDropoutBatch + w * kDropoutBatchGroups + group % kDropoutBatchGroups;
}

// Element dtypes the dropout kernels take.
enum class DropoutDtype : int { F32 = 0, F64 = 1, F16 = 2, BF16 = 3 };

// What a dropout call needs besides the data: derived once on the host from p.
struct DropoutParams {
  uint64_t seed = 0;
  // CUDA only: where the seed lies in device memory, read by the kernel instead of `seed`. A seed drawn on the
  // device (torch's CUDA generator) is then never copied to the host, so a captured CUDA graph draws a new
  // seed, and applies a new mask, at every replay. Null on the CPU.
  const int64_t* seed_on_device = nullptr;
  uint32_t threshold = 0;  // keep element i iff its word >= threshold
  bool drop_all = false;   // p == 1: every element is dropped (the threshold cannot say so)
  float scale_f32 = 1.0f;  // 1 / (1 - p), rounded once to float32 (float32, float16 and bfloat16 data)
  double scale_f64 = 1.0;  // 1 / (1 - p) for float64 data
};

// p in [0, 1] (the caller checks the range).
inline DropoutParams make_dropout_params(double p, uint64_t seed) {
  DropoutParams d;
  d.seed = seed;
  d.drop_all = p >= 1.0;
  const double t = p * 4294967296.0 + 0.5;  // round(p * 2^32), capped below 2^32
  d.threshold = d.drop_all ? 0u : (t >= 4294967295.0 ? 4294967295u : uint32_t(t));
  d.scale_f64 = d.drop_all ? 0.0 : 1.0 / (1.0 - p);
  d.scale_f32 = float(d.scale_f64);
  return d;
}

// The factor element with random word `word` is multiplied by: the scale or zero. Dropped elements are
// multiplied by zero rather than set to zero so that inf and NaN propagate as in torch's dropout.
QLORA_HD float dropout_factor_f32(const DropoutParams& d, uint32_t word) {
  return (!d.drop_all && word >= d.threshold) ? d.scale_f32 : 0.0f;
}
QLORA_HD double dropout_factor_f64(const DropoutParams& d, uint32_t word) {
  return (!d.drop_all && word >= d.threshold) ? d.scale_f64 : 0.0;
}

// One element: y = x * factor, computed in float32 (float64 for float64 data) and rounded once to the
// element type. x and y point at elements of type `dtype`.
QLORA_HD void dropout_element(const void* x, void* y, int64_t i, DropoutDtype dtype, const DropoutParams& d,
                              uint32_t word) {
  switch (dtype) {
    case DropoutDtype::F32:
      static_cast<float*>(y)[i] = mul_rn(static_cast<const float*>(x)[i], dropout_factor_f32(d, word));
      break;
    case DropoutDtype::F64:
      static_cast<double*>(y)[i] = static_cast<const double*>(x)[i] * dropout_factor_f64(d, word);
      break;
    case DropoutDtype::F16:
      static_cast<uint16_t*>(y)[i] =
          f32_to_f16_rn(mul_rn(f16_to_f32(static_cast<const uint16_t*>(x)[i]), dropout_factor_f32(d, word)));
      break;
    case DropoutDtype::BF16:
      static_cast<uint16_t*>(y)[i] =
          f32_to_bf16_rn(mul_rn(bf16_to_f32(static_cast<const uint16_t*>(x)[i]), dropout_factor_f32(d, word)));
      break;
  }
}

}  // namespace qlora
