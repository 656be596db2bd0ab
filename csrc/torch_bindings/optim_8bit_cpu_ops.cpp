// CPU implementation of the 8-bit-state AdamW ops: checks, then parallel loops over 256-element blocks
// (csrc/kernels/adamw8bit_cpu.cpp does the arithmetic).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>

#include "../kernels/adamw8bit_cpu.h"
#include "optim_8bit_common.h"

namespace qlora::ops {
namespace {

// 64 blocks (16K elements, like the 32-bit kernel's chunk) per task at least.
constexpr int64_t kGrainBlocks = 64;

void adamw8bit_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avg_codes,
                        at::TensorList exp_avg_absmax, at::TensorList exp_avg_sq_codes,
                        at::TensorList exp_avg_sq_absmax, at::TensorList steps, double lr, double beta1,
                        double beta2, double eps, double weight_decay, bool maximize) {
  const AdamW8bitLaunch launch =
      prepare_adamw8bit_step(params, grads, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax,
                             steps, lr, beta1, beta2, eps, weight_decay, maximize, c10::DeviceType::CPU);
  const AdamW8bitTensor* tensors = launch.tensors.data();
  const int64_t ntensors = int64_t(launch.tensors.size());
  at::parallel_for(0, launch.total_blocks, kGrainBlocks, [&](int64_t b0, int64_t b1) {
    cpu::adamw8bit_step_blocks(tensors, ntensors, launch.group, b0, b1);
  });
}

std::tuple<at::Tensor, at::Tensor> quantize_8bit_dynamic_cpu(const at::Tensor& x_in, bool is_signed) {
  const at::Tensor x = check_quantize_8bit_args(x_in, c10::DeviceType::CPU);
  const int64_t n = x.numel(), nblocks = adamw8bit_blocks(n);
  at::Tensor codes = at::empty(x.sizes(), x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({nblocks}, x.options());
  const float* xp = x.data_ptr<float>();
  uint8_t* cp = static_cast<uint8_t*>(codes.data_ptr());
  float* ap = absmax.data_ptr<float>();
  at::parallel_for(0, nblocks, kGrainBlocks, [&](int64_t b0, int64_t b1) {
    cpu::quantize_8bit_dynamic_blocks(xp, n, is_signed, cp, ap, b0, b1);
  });
  return {codes, absmax};
}

at::Tensor dequantize_8bit_dynamic_cpu(const at::Tensor& codes_in, const at::Tensor& absmax_in, bool is_signed) {
  check_dequantize_8bit_args(codes_in, absmax_in, c10::DeviceType::CPU);
  const at::Tensor codes = codes_in.contiguous(), absmax = absmax_in.contiguous();
  const int64_t n = codes.numel();
  at::Tensor out = at::empty(codes.sizes(), codes.options().dtype(at::kFloat));
  const uint8_t* cp = static_cast<const uint8_t*>(codes.data_ptr());
  const float* ap = absmax.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, adamw8bit_blocks(n), kGrainBlocks, [&](int64_t b0, int64_t b1) {
    cpu::dequantize_8bit_dynamic_blocks(cp, ap, n, is_signed, op, b0, b1);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora_ext, CPU, m) {
  m.impl("adamw8bit_step_", &adamw8bit_step_cpu);
  m.impl("quantize_8bit_dynamic", &quantize_8bit_dynamic_cpu);
  m.impl("dequantize_8bit_dynamic", &dequantize_8bit_dynamic_cpu);
}

}  // namespace qlora::ops
