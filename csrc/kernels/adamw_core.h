// The AdamW update of one element, shared by the CPU and CUDA kernels (like numeric_core.h, every
// function is __host__ __device__ and every operation is rounded on its own, so both devices give the
// same bits). Parameters and gradients are float32/float16/bfloat16, states float32; the arithmetic is
// float32 and the parameter is rounded to its own type once per step.
#pragma once

#include <cstdint>

#include "numeric_core.h"

namespace qlora {

QLORA_HD float sqrt_rn(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);  // IEEE sqrt is correctly rounded, like __fsqrt_rn
#endif
}

// a * b + c rounded once (torch's CPU and CUDA kernels fuse lerp and addcmul into FMAs: so do we, to give
// its bits).
QLORA_HD float fma_rn(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

// The hyperparameters of one parameter group, as float32 (computed on the host in double, as
// torch.optim.AdamW computes them in Python, and rounded once).
struct AdamWGroup {
  float decay = 1.0f;            // 1 - lr * weight_decay (decoupled weight decay)
  // exp_avg = lerp(exp_avg, grad, w) with w = 1 - beta1, as torch computes it: fma(w, g - m, m) for w < 0.5,
  // else fma(w - 1, g - m, g).
  float lerp_coeff = 0.1f;
  int32_t lerp_from_grad = 0;
  float beta2 = 0.999f;
  float one_minus_beta2 = 0.001f;
  float eps = 1e-8f;
  float grad_sign = 1.0f;        // -1 with maximize
};

// One tensor of a multi-tensor step: raw pointers (param and grad of `format`, dense, with the same
// layout; the two states float32 in that layout too) and the step sizes of its own step count.
struct AdamWTensor {
  void* param = nullptr;
  const void* grad = nullptr;
  float* exp_avg = nullptr;
  float* exp_avg_sq = nullptr;
  int64_t numel = 0;
  int64_t first_chunk = 0;            // index of this tensor's first chunk in the launch (prefix sum)
  float neg_step_size = 0.0f;         // -lr / (1 - beta1^t)
  float bias_correction2_sqrt = 1.0f; // sqrt(1 - beta2^t)
  FloatFormat format = FloatFormat::F32;
  int32_t vector_aligned = 0;         // CUDA: all four pointers allow 4-element vector accesses
};

// The update in torch.optim.AdamW's order of operations and roundings (foreach path, whose lerp and
// addcmul kernels compile to FMAs on CPU and CUDA):
//   p *= 1 - lr*wd;  m = lerp(m, g, 1 - beta1);  v = v*beta2 + ((1 - beta2)*g)*g;
//   p += (-step_size * m) / (sqrt(v) / sqrt(1 - beta2^t) + eps)
QLORA_HD float adamw_update(float p, float g, float& m, float& v, const AdamWGroup& h, float neg_step_size,
                            float bias_correction2_sqrt) {
  g = mul_rn(g, h.grad_sign);
  p = mul_rn(p, h.decay);
  m = fma_rn(h.lerp_coeff, sub_rn(g, m), h.lerp_from_grad ? g : m);
  v = fma_rn(mul_rn(h.one_minus_beta2, g), g, mul_rn(v, h.beta2));
  const float denom = add_rn(div_rn(sqrt_rn(v), bias_correction2_sqrt), h.eps);
  return add_rn(p, div_rn(mul_rn(neg_step_size, m), denom));
}

}  // namespace qlora
