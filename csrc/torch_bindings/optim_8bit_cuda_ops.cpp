// CUDA implementation of the 8-bit-state AdamW ops: one multi-tensor launch per step on PyTorch's current
// stream (the per-tensor table goes through pinned memory, as for adamw_step_), no host synchronization.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "../kernels/adamw8bit_cuda.h"
#include "device_table.h"
#include "optim_8bit_common.h"

namespace qlora::ops {
namespace {

void adamw8bit_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avg_codes,
                         at::TensorList exp_avg_absmax, at::TensorList exp_avg_sq_codes,
                         at::TensorList exp_avg_sq_absmax, at::TensorList steps, double lr, double beta1,
                         double beta2, double eps, double weight_decay, bool maximize) {
  const AdamW8bitLaunch launch =
      prepare_adamw8bit_step(params, grads, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax,
                             steps, lr, beta1, beta2, eps, weight_decay, maximize, c10::DeviceType::CUDA);
  if (launch.tensors.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor table = upload_table(launch.tensors, params[0].device());
  C10_CUDA_CHECK(cuda::adamw8bit_step_multi_tensor(static_cast<const AdamW8bitTensor*>(table.data_ptr()),
                                                   int(launch.tensors.size()), launch.total_blocks, launch.group,
                                                   current_sm_count(), stream));
}

std::tuple<at::Tensor, at::Tensor> quantize_8bit_dynamic_cuda(const at::Tensor& x_in, bool is_signed) {
  const at::Tensor x = check_quantize_8bit_args(x_in, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.numel();
  at::Tensor codes = at::empty(x.sizes(), x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({adamw8bit_blocks(n)}, x.options());
  C10_CUDA_CHECK(cuda::quantize_8bit_dynamic(x.data_ptr<float>(), n, is_signed,
                                             static_cast<uint8_t*>(codes.data_ptr()), absmax.data_ptr<float>(),
                                             current_sm_count(), at::cuda::getCurrentCUDAStream()));
  return {codes, absmax};
}

at::Tensor dequantize_8bit_dynamic_cuda(const at::Tensor& codes_in, const at::Tensor& absmax_in, bool is_signed) {
  check_dequantize_8bit_args(codes_in, absmax_in, c10::DeviceType::CUDA);
  TORCH_CHECK(absmax_in.device() == codes_in.device(), "absmax must be on codes' device ", codes_in.device(),
              ", got ", absmax_in.device());
  const c10::cuda::CUDAGuard guard(codes_in.device());
  const at::Tensor codes = codes_in.contiguous(), absmax = absmax_in.contiguous();
  at::Tensor out = at::empty(codes.sizes(), codes.options().dtype(at::kFloat));
  C10_CUDA_CHECK(cuda::dequantize_8bit_dynamic(static_cast<const uint8_t*>(codes.data_ptr()),
                                               absmax.data_ptr<float>(), codes.numel(), is_signed,
                                               out.data_ptr<float>(), current_sm_count(), at::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora_ext, CUDA, m) {
  m.impl("adamw8bit_step_", &adamw8bit_step_cuda);
  m.impl("quantize_8bit_dynamic", &quantize_8bit_dynamic_cuda);
  m.impl("dequantize_8bit_dynamic", &dequantize_8bit_dynamic_cuda);
}

}  // namespace qlora::ops
