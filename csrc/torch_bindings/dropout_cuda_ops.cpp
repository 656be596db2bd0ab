// CUDA implementation of the dropout op: check inputs, launch the torch-free kernel of
// csrc/kernels/dropout_cuda.cu on PyTorch's current stream.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../kernels/dropout_cuda.h"
#include "dropout_common.h"
#include "op_checks.h"

namespace qlora::ops {
namespace {

at::Tensor dropout_cuda(const at::Tensor& x, const at::Tensor& seed, double p) {
  const DropoutDtype dtype = dropout_dtype(x);
  check_device(x, "x", c10::DeviceType::CUDA);
  const DropoutParams d = dropout_params_cuda(seed, p, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty(xc.sizes(), xc.options());
  C10_CUDA_CHECK(cuda::dropout(xc.data_ptr(), y.data_ptr(), xc.numel(), dtype, d, at::cuda::getCurrentCUDAStream()));
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora_ext, CUDA, m) { m.impl("dropout", &dropout_cuda); }

}  // namespace qlora::ops
