// Argument checks and parameters shared by the CPU and CUDA dropout ops.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "../kernels/dropout_core.h"

namespace qlora::ops {

inline DropoutDtype dropout_dtype(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return DropoutDtype::F32;
    case at::kDouble: return DropoutDtype::F64;
    case at::kHalf: return DropoutDtype::F16;
    case at::kBFloat16: return DropoutDtype::BF16;
    default: TORCH_CHECK_TYPE(false, "x must be float32, float64, float16 or bfloat16, got ", x.scalar_type());
  }
}

inline void check_dropout_args(const at::Tensor& seed, double p) {
  TORCH_CHECK_VALUE(p >= 0.0 && p <= 1.0, "p must be in [0, 1], got ", p);
  TORCH_CHECK_TYPE(seed.scalar_type() == at::kLong, "seed must be int64, got ", seed.scalar_type());
  TORCH_CHECK_VALUE(seed.numel() == 1, "seed must have one element, got ", seed.numel());
}

// CPU x: the seed is a CPU tensor, read here.
inline DropoutParams dropout_params_cpu(const at::Tensor& seed, double p) {
  check_dropout_args(seed, p);
  TORCH_CHECK(seed.device().is_cpu(), "seed must be a CPU tensor for a CPU x, got ", seed.device());
  return make_dropout_params(p, static_cast<uint64_t>(seed.item<int64_t>()));
}

// CUDA x: a seed on x's device is read by the kernel (no synchronization, and graph capture records the
// read, not the value); a CPU seed is read here, as on the CPU.
inline DropoutParams dropout_params_cuda(const at::Tensor& seed, double p, const at::Tensor& x) {
  check_dropout_args(seed, p);
  if (seed.device().is_cpu()) return make_dropout_params(p, static_cast<uint64_t>(seed.item<int64_t>()));
  TORCH_CHECK(seed.device() == x.device(), "seed must be a CPU tensor or on x's device (", x.device(), "), got ",
              seed.device());
  DropoutParams d = make_dropout_params(p, 0);
  d.seed_on_device = seed.data_ptr<int64_t>();
  return d;
}

}  // namespace qlora::ops
