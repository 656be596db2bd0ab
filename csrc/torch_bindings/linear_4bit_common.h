// Checks shared by the CPU and CUDA implementations of linear_4bit (y = x @ W^T + bias) and its input
// gradient (dx = dy @ W), W [N, K] stored in the canonical 4-bit layout.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>

#include "op_checks.h"

namespace qlora::ops {

struct Linear4bitArgs {
  int64_t n = 0;  // out_features
  int64_t k = 0;  // in_features
  QuantType quant_type = QuantType::NF4;
  bool double_quant = false;
};

// act: x [..., K] (forward) or grad_out [..., N] (backward).
inline Linear4bitArgs check_linear_4bit_args(const at::Tensor& act, const char* act_name, const at::Tensor& codes,
                                             const at::Tensor& absmax,
                                             const std::optional<at::Tensor>& absmax_scale,
                                             const std::optional<at::Tensor>& absmax_mean, int64_t blocksize,
                                             const std::string& quant_type, int64_t n, int64_t k,
                                             c10::DeviceType device) {
  TORCH_CHECK_VALUE(act.dim() >= 1, act_name, " must have at least one dimension, got a scalar");
  const at::ScalarType t = act.scalar_type();
  const bool fp64_ok = device == c10::DeviceType::CPU;
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || (fp64_ok && t == at::kDouble),
                   act_name, " must be float32, float16 or bfloat16", fp64_ok ? " (or float64 on CPU)" : "",
                   ", got ", t);
  check_device(act, act_name, device);
  TORCH_CHECK_VALUE(n > 0 && k > 0, "out_features and in_features must be positive, got ", n, " and ", k);
  check_blocksize(blocksize);
  TORCH_CHECK_VALUE(k % blocksize == 0, "in_features (K = ", k, ") must be a multiple of blocksize (", blocksize,
                    ") so that every weight row starts a new block");
  TORCH_CHECK_VALUE(codes.numel() * 2 == n * k || codes.numel() * 2 - 1 == n * k,
                    "the quantized weight holds ", codes.numel(), " bytes of codes, which is not [out_features=", n,
                    ", in_features=", k, "]: ", act_name, "'s last dimension or out_features does not match the weight");
  Linear4bitArgs a;
  a.n = n;
  a.k = k;
  // The weight's format checks are dequantize's: same messages.
  const int64_t shape[2] = {n, k};
  const DequantArgs d = check_dequantize_args(codes, absmax, absmax_scale, absmax_mean, blocksize, quant_type,
                                              at::IntArrayRef(shape, 2), at::kFloat, device);
  check_same_device(codes, "codes", act, act_name);  // and check_dequantize_args put the rest on codes' device
  a.quant_type = d.quant_type;
  a.double_quant = d.double_quant;
  return a;
}

inline void check_bias(const std::optional<at::Tensor>& bias, const at::Tensor& x, int64_t n) {
  if (!bias.has_value()) return;
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == n, "bias must have shape [", n, "], got ", bias->sizes());
  TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), "bias must have x's dtype ", x.scalar_type(), ", got ",
                   bias->scalar_type());
  check_same_device(*bias, "bias", x, "x");
}

// Output shape [..., last] from act [..., *].
inline std::vector<int64_t> with_last_dim(const at::Tensor& act, int64_t last) {
  std::vector<int64_t> s(act.sizes().begin(), act.sizes().end());
  s.back() = last;
  return s;
}

}  // namespace qlora::ops
