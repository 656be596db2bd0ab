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

// The seed is read on the host: a CUDA seed would cost a synchronization per call.
inline DropoutParams dropout_params(const at::Tensor& seed, double p) {
  TORCH_CHECK_VALUE(p >= 0.0 && p <= 1.0, "p must be in [0, 1], got ", p);
  TORCH_CHECK_TYPE(seed.scalar_type() == at::kLong, "seed must be int64, got ", seed.scalar_type());
  TORCH_CHECK(seed.device().is_cpu(), "seed must be a CPU tensor (it is read on the host), got ", seed.device());
  TORCH_CHECK_VALUE(seed.numel() == 1, "seed must have one element, got ", seed.numel());
  return make_dropout_params(p, static_cast<uint64_t>(seed.item<int64_t>()));
}

}  // namespace qlora::ops
