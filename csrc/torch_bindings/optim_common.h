// Checks and launch preparation shared by the CPU and CUDA implementations of adamw_step_: every list
// entry is checked before any state changes, then the step counts are incremented and each tensor gets
// its bias-corrected step sizes (computed in double, as torch.optim.AdamW does in Python).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <string>
#include <vector>

#include "../kernels/adamw_core.h"
#include "op_checks.h"

namespace qlora::ops {

struct AdamWLaunch {
  std::vector<AdamWTensor> tensors;  // the non-empty tensors, numbered into chunks
  AdamWGroup group;
  int64_t total_chunks = 0;
};

inline std::string list_item(const char* list, size_t i) { return std::string(list) + "[" + std::to_string(i) + "]"; }

// Whether two tensors of one shape put every element at the same offset (strides of size-1 dims do not matter).
inline bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

inline void check_like_param(const at::Tensor& t, const at::Tensor& p, const char* list, size_t i) {
  const std::string name = list_item(list, i);
  TORCH_CHECK(t.layout() == at::kStrided, name, " must be a dense (strided) tensor, got layout ", t.layout(),
              " (sparse gradients are not supported)");
  TORCH_CHECK(t.device() == p.device(), name, " must be on params[", i, "]'s device ", p.device(), ", got ",
              t.device());
  TORCH_CHECK_VALUE(t.sizes() == p.sizes(), name, " must have params[", i, "]'s shape ", p.sizes(), ", got ",
                    t.sizes());
  TORCH_CHECK_VALUE(same_layout(t, p), name, " must have params[", i, "]'s strides ", p.strides(), ", got ",
                    t.strides());
}

// The hyperparameter checks of both AdamW ops.
inline void check_adamw_hyperparameters(double lr, double beta1, double beta2, double eps) {
  TORCH_CHECK_VALUE(lr >= 0.0, "lr must be >= 0, got ", lr);
  TORCH_CHECK_VALUE(beta1 >= 0.0 && beta1 < 1.0, "beta1 must be in [0, 1), got ", beta1);
  TORCH_CHECK_VALUE(beta2 >= 0.0 && beta2 < 1.0, "beta2 must be in [0, 1), got ", beta2);
  TORCH_CHECK_VALUE(eps >= 0.0, "eps must be >= 0, got ", eps);
}

// The checks of params[i] shared by both AdamW ops (dtype, layout, one device of the expected type).
inline void check_adamw_param(at::TensorList params, size_t i, c10::DeviceType device) {
  const at::Tensor& p = params[i];
  const std::string pname = list_item("params", i);
  TORCH_CHECK(p.layout() == at::kStrided, pname, " must be a dense (strided) tensor, got layout ", p.layout());
  TORCH_CHECK_TYPE(!p.is_complex(), pname, " is complex (", p.scalar_type(),
                   "): complex parameters are not supported");
  float_format(p.scalar_type(), pname.c_str());
  check_device(p, pname.c_str(), device);
  TORCH_CHECK(p.device() == params[0].device(), pname, " is on ", p.device(), " but params[0] is on ",
              params[0].device(), ": all parameters of a step must be on one device");
  TORCH_CHECK_VALUE(p.is_non_overlapping_and_dense(), pname,
                    " must be non-overlapping and dense (a contiguous tensor or a permutation of one), got "
                    "strides ", p.strides(), " for shape ", p.sizes());
}

inline void check_adamw_step_count(const at::Tensor& step, size_t i) {
  const std::string sname = list_item("steps", i);
  check_device(step, sname.c_str(), c10::DeviceType::CPU);
  check_dtype(step, sname.c_str(), at::kFloat);
  check_numel(step, sname.c_str(), 1, "the step count, a scalar");
}

// A parameter group's float32 constants, computed in double as torch.optim.AdamW computes them in Python.
inline AdamWGroup make_adamw_group(double lr, double beta1, double beta2, double eps, double weight_decay,
                                   bool maximize) {
  AdamWGroup group;
  group.decay = float(1.0 - lr * weight_decay);
  // torch's lerp takes the weight as float and switches formula at 0.5 (for accuracy near each end).
  const float lerp_weight = float(1.0 - beta1);
  group.lerp_from_grad = !(std::fabs(lerp_weight) < 0.5f);
  group.lerp_coeff = group.lerp_from_grad ? lerp_weight - 1.0f : lerp_weight;
  group.beta2 = float(beta2);
  group.one_minus_beta2 = float(1.0 - beta2);
  group.eps = float(eps);
  group.grad_sign = maximize ? -1.0f : 1.0f;
  return group;
}

// Increments a step count (CPU float32, as torch keeps it) and returns the tensor's step sizes for it:
// {-lr / (1 - beta1^t), sqrt(1 - beta2^t)}.
struct AdamWStepSizes {
  float neg_step_size;
  float bias_correction2_sqrt;
};
inline AdamWStepSizes advance_step(const at::Tensor& step_tensor, double lr, double beta1, double beta2) {
  float* step = step_tensor.data_ptr<float>();
  *step += 1.0f;
  const double t = double(*step);
  const double bias_correction1 = 1.0 - std::pow(beta1, t);
  const double bias_correction2 = 1.0 - std::pow(beta2, t);
  return {float(-(lr / bias_correction1)), float(std::pow(bias_correction2, 0.5))};
}

// params[i] (float, dense, on `device`), its gradient (like it, same dtype) and its step count.
inline void check_param_grad_step(at::TensorList params, at::TensorList grads, at::TensorList steps, size_t i,
                                  c10::DeviceType device) {
  const at::Tensor& p = params[i];
  check_adamw_param(params, i, device);
  check_like_param(grads[i], p, "grads", i);
  TORCH_CHECK_TYPE(grads[i].scalar_type() == p.scalar_type(), "grads[", i, "] must have params[", i,
                   "]'s dtype ", p.scalar_type(), ", got ", grads[i].scalar_type());
  check_adamw_step_count(steps[i], i);
}

inline AdamWLaunch prepare_adamw_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                      at::TensorList exp_avg_sqs, at::TensorList steps, double lr, double beta1,
                                      double beta2, double eps, double weight_decay, bool maximize,
                                      c10::DeviceType device, int64_t chunk_elements) {
  const size_t n = params.size();
  TORCH_CHECK_VALUE(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && steps.size() == n,
                    "params, grads, exp_avgs, exp_avg_sqs and steps must have the same length, got ", n, ", ",
                    grads.size(), ", ", exp_avgs.size(), ", ", exp_avg_sqs.size(), " and ", steps.size());
  check_adamw_hyperparameters(lr, beta1, beta2, eps);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    check_param_grad_step(params, grads, steps, i, device);
    check_like_param(exp_avgs[i], p, "exp_avgs", i);
    check_dtype(exp_avgs[i], list_item("exp_avgs", i).c_str(), at::kFloat);
    check_like_param(exp_avg_sqs[i], p, "exp_avg_sqs", i);
    check_dtype(exp_avg_sqs[i], list_item("exp_avg_sqs", i).c_str(), at::kFloat);
  }

  AdamWLaunch launch;
  launch.group = make_adamw_group(lr, beta1, beta2, eps, weight_decay, maximize);
  launch.tensors.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const AdamWStepSizes sizes = advance_step(steps[i], lr, beta1, beta2);
    if (params[i].numel() == 0) continue;
    AdamWTensor x;
    x.param = params[i].data_ptr();
    x.grad = grads[i].data_ptr();
    x.exp_avg = exp_avgs[i].data_ptr<float>();
    x.exp_avg_sq = exp_avg_sqs[i].data_ptr<float>();
    x.numel = params[i].numel();
    x.first_chunk = launch.total_chunks;
    x.neg_step_size = sizes.neg_step_size;
    x.bias_correction2_sqrt = sizes.bias_correction2_sqrt;
    x.format = float_format(params[i].scalar_type(), "params");
    const uintptr_t vec16 = 4 * uintptr_t(params[i].element_size());  // 4 elements of param and grad
    x.vector_aligned = reinterpret_cast<uintptr_t>(x.param) % vec16 == 0 &&
                       reinterpret_cast<uintptr_t>(x.grad) % vec16 == 0 &&
                       reinterpret_cast<uintptr_t>(x.exp_avg) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(x.exp_avg_sq) % 16 == 0;
    launch.total_chunks += (x.numel + chunk_elements - 1) / chunk_elements;
    launch.tensors.push_back(x);
  }
  return launch;
}

}  // namespace qlora::ops
