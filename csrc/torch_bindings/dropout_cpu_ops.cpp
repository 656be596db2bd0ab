// CPU implementation of the dropout op: check inputs, split the 64-element batches over threads, call the
// torch-free kernel in csrc/kernels/dropout_cpu.cpp.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../kernels/dropout_cpu.h"
#include "dropout_common.h"
#include "op_checks.h"

namespace qlora::ops {
namespace {

constexpr int64_t kGrainBatches = 256;  // 16K elements per task

at::Tensor dropout_cpu(const at::Tensor& x, const at::Tensor& seed, double p) {
  const DropoutDtype dtype = dropout_dtype(x);
  check_device(x, "x", c10::DeviceType::CPU);
  const DropoutParams d = dropout_params_cpu(seed, p);
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty(xc.sizes(), xc.options());
  const int64_t numel = xc.numel();
  const void* src = xc.data_ptr();
  void* dst = y.data_ptr();
  const int64_t batches = (numel + kDropoutBatch - 1) / kDropoutBatch;
  at::parallel_for(0, batches, kGrainBatches, [&](int64_t b0, int64_t b1) {
    cpu::dropout_batches(src, dst, numel, dtype, d, b0, b1);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora_ext, CPU, m) { m.impl("dropout", &dropout_cpu); }

}  // namespace qlora::ops
