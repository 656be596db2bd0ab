// CUDA implementation of linear_4bit and its input gradient. Today's path is dequantize + cuBLAS
// (as bitsandbytes does for training: the dense W exists transiently in x's dtype); the fused
// dequant-GEMM kernels replace it shape by shape once the benchmarks on a GPU show them faster.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../kernels/quantize_cuda.h"
#include "linear_4bit_common.h"

namespace qlora::ops {
namespace {

at::Tensor dequantize_weight(const at::Tensor& codes, const at::Tensor& absmax,
                             const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& mean,
                             int64_t blocksize, const Linear4bitArgs& a, at::ScalarType dtype) {
  const at::Tensor c = codes.contiguous(), am = absmax.contiguous();
  at::Tensor scale_c, mean_c;
  AbsmaxSource src;
  if (a.double_quant) {
    scale_c = scale->contiguous();
    mean_c = mean->contiguous();
    src.fp8 = am.data_ptr<uint8_t>();
    src.chunk_scale = scale_c.data_ptr<float>();
    src.mean = mean_c.data_ptr<float>();
  } else {
    src.f32 = am.data_ptr<float>();
  }
  at::Tensor w = at::empty({a.n, a.k}, c.options().dtype(dtype));
  C10_CUDA_CHECK(cuda::dequantize_4bit(c.data_ptr<uint8_t>(), src, a.n * a.k, int(blocksize),
                                       make_codebook(a.quant_type), w.data_ptr(), float_format(dtype, "x"),
                                       at::cuda::getCurrentCUDAStream()));
  return w;
}

at::Tensor linear_4bit_cuda(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& absmax,
                            const std::optional<at::Tensor>& absmax_scale,
                            const std::optional<at::Tensor>& absmax_mean, const std::optional<at::Tensor>& bias,
                            int64_t blocksize, const std::string& quant_type, int64_t out_features) {
  const Linear4bitArgs a = check_linear_4bit_args(x, "x", codes, absmax, absmax_scale, absmax_mean, blocksize,
                                                  quant_type, out_features, x.dim() ? x.size(-1) : 0,
                                                  c10::DeviceType::CUDA);
  check_bias(bias, x, a.n);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x2 = x.reshape({-1, a.k});
  const at::Tensor w = dequantize_weight(codes, absmax, absmax_scale, absmax_mean, blocksize, a, x.scalar_type());
  const at::Tensor y = bias.has_value() ? at::addmm(*bias, x2, w.t()) : at::mm(x2, w.t());
  return y.view(with_last_dim(x, a.n));
}

at::Tensor linear_4bit_grad_input_cuda(const at::Tensor& grad_out, const at::Tensor& codes, const at::Tensor& absmax,
                                       const std::optional<at::Tensor>& absmax_scale,
                                       const std::optional<at::Tensor>& absmax_mean, int64_t blocksize,
                                       const std::string& quant_type, int64_t in_features) {
  const Linear4bitArgs a = check_linear_4bit_args(grad_out, "grad_out", codes, absmax, absmax_scale, absmax_mean,
                                                  blocksize, quant_type, grad_out.dim() ? grad_out.size(-1) : 0,
                                                  in_features, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const at::Tensor dy = grad_out.reshape({-1, a.n});
  const at::Tensor w =
      dequantize_weight(codes, absmax, absmax_scale, absmax_mean, blocksize, a, grad_out.scalar_type());
  return at::mm(dy, w).view(with_last_dim(grad_out, a.k));
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora_ext, CUDA, m) {
  m.impl("linear_4bit", &linear_4bit_cuda);
  m.impl("linear_4bit_grad_input", &linear_4bit_grad_input_cuda);
}

}  // namespace qlora::ops
