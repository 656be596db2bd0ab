// Checks and launch preparation shared by the CPU and CUDA implementations of the 8-bit-state AdamW ops
// (adamw8bit_step_, quantize_8bit_dynamic, dequantize_8bit_dynamic): every list entry is checked before any
// state changes, then the step counts are incremented and each tensor gets its step sizes (optim_common.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>
#include <vector>

#include "../kernels/adamw8bit_core.h"
#include "optim_common.h"

namespace qlora::ops {

struct AdamW8bitLaunch {
  std::vector<AdamW8bitTensor> tensors;  // the non-empty tensors, their blocks numbered 0 .. total_blocks-1
  AdamWGroup group;
  int64_t total_blocks = 0;
};

// absmax of a state: float32, contiguous, one per block of the parameter, on its device.
inline void check_absmax_list(const at::Tensor& a, const at::Tensor& p, const char* list, size_t i) {
  const std::string name = list_item(list, i);
  check_dtype(a, name.c_str(), at::kFloat);
  TORCH_CHECK(a.device() == p.device(), name, " must be on params[", i, "]'s device ", p.device(), ", got ",
              a.device());
  check_numel(a, name.c_str(), adamw8bit_blocks(p.numel()), "one per block of 256 elements of the parameter");
  TORCH_CHECK_VALUE(a.is_contiguous(), name, " must be contiguous");
}

inline AdamW8bitLaunch prepare_adamw8bit_step(at::TensorList params, at::TensorList grads,
                                              at::TensorList exp_avg_codes, at::TensorList exp_avg_absmax,
                                              at::TensorList exp_avg_sq_codes, at::TensorList exp_avg_sq_absmax,
                                              at::TensorList steps, double lr, double beta1, double beta2,
                                              double eps, double weight_decay, bool maximize,
                                              c10::DeviceType device) {
  const size_t n = params.size();
  TORCH_CHECK_VALUE(grads.size() == n && exp_avg_codes.size() == n && exp_avg_absmax.size() == n &&
                        exp_avg_sq_codes.size() == n && exp_avg_sq_absmax.size() == n && steps.size() == n,
                    "params, grads, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax and steps "
                    "must have the same length, got ", n, ", ", grads.size(), ", ", exp_avg_codes.size(), ", ",
                    exp_avg_absmax.size(), ", ", exp_avg_sq_codes.size(), ", ", exp_avg_sq_absmax.size(), " and ",
                    steps.size());
  check_adamw_hyperparameters(lr, beta1, beta2, eps);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    check_param_grad_step(params, grads, steps, i, device);
    check_like_param(exp_avg_codes[i], p, "exp_avg_codes", i);
    check_dtype(exp_avg_codes[i], list_item("exp_avg_codes", i).c_str(), at::kByte);
    check_like_param(exp_avg_sq_codes[i], p, "exp_avg_sq_codes", i);
    check_dtype(exp_avg_sq_codes[i], list_item("exp_avg_sq_codes", i).c_str(), at::kByte);
    check_absmax_list(exp_avg_absmax[i], p, "exp_avg_absmax", i);
    check_absmax_list(exp_avg_sq_absmax[i], p, "exp_avg_sq_absmax", i);
  }

  AdamW8bitLaunch launch;
  launch.group = make_adamw_group(lr, beta1, beta2, eps, weight_decay, maximize);
  launch.tensors.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const AdamWStepSizes sizes = advance_step(steps[i], lr, beta1, beta2);
    if (params[i].numel() == 0) continue;
    AdamW8bitTensor x;
    x.param = params[i].data_ptr();
    x.grad = grads[i].data_ptr();
    x.exp_avg_codes = static_cast<uint8_t*>(exp_avg_codes[i].data_ptr());
    x.exp_avg_absmax = exp_avg_absmax[i].data_ptr<float>();
    x.exp_avg_sq_codes = static_cast<uint8_t*>(exp_avg_sq_codes[i].data_ptr());
    x.exp_avg_sq_absmax = exp_avg_sq_absmax[i].data_ptr<float>();
    x.numel = params[i].numel();
    x.first_block = launch.total_blocks;
    x.neg_step_size = sizes.neg_step_size;
    x.bias_correction2_sqrt = sizes.bias_correction2_sqrt;
    x.format = float_format(params[i].scalar_type(), "params");
    // CUDA moves 8 elements per access: 8 codes (8 bytes), 8 params and grads (16 or 32 bytes).
    const uintptr_t vec = 8 * uintptr_t(params[i].element_size());
    x.vector_aligned = reinterpret_cast<uintptr_t>(x.param) % vec == 0 &&
                       reinterpret_cast<uintptr_t>(x.grad) % vec == 0 &&
                       reinterpret_cast<uintptr_t>(x.exp_avg_codes) % 8 == 0 &&
                       reinterpret_cast<uintptr_t>(x.exp_avg_sq_codes) % 8 == 0;
    launch.total_blocks += adamw8bit_blocks(x.numel);
    launch.tensors.push_back(x);
  }
  return launch;
}

// quantize_8bit_dynamic: x float32 on `device`; returns the contiguous input.
inline at::Tensor check_quantize_8bit_args(const at::Tensor& x, c10::DeviceType device) {
  check_dtype(x, "x", at::kFloat);
  check_device(x, "x", device);
  TORCH_CHECK(x.layout() == at::kStrided, "x must be a dense (strided) tensor, got layout ", x.layout());
  return x.contiguous();
}

// dequantize_8bit_dynamic: codes uint8 and absmax float32 (one per block of codes) on `device`.
inline void check_dequantize_8bit_args(const at::Tensor& codes, const at::Tensor& absmax, c10::DeviceType device) {
  check_dtype(codes, "codes", at::kByte);
  check_device(codes, "codes", device);
  check_dtype(absmax, "absmax", at::kFloat);
  check_same_device(absmax, "absmax", codes, "codes");
  check_numel(absmax, "absmax", adamw8bit_blocks(codes.numel()), "one per block of 256 codes");
}

}  // namespace qlora::ops
