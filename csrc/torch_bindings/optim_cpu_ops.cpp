// CPU implementation of adamw_step_: checks, then one parallel loop over the chunks of all tensors
// (csrc/kernels/adamw_cpu.cpp does the arithmetic).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../kernels/adamw_cpu.h"
#include "optim_common.h"

namespace qlora::ops {
namespace {

void adamw_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList steps, double lr, double beta1, double beta2,
                    double eps, double weight_decay, bool maximize) {
  const AdamWLaunch launch = prepare_adamw_step(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps,
                                                weight_decay, maximize, c10::DeviceType::CPU, cpu::kAdamWCpuChunk);
  const AdamWTensor* tensors = launch.tensors.data();
  const int64_t ntensors = int64_t(launch.tensors.size());
  // Grain of one chunk (16K elements, ~200 KB of traffic): threads split the chunk range evenly.
  at::parallel_for(0, launch.total_chunks, 1, [&](int64_t c0, int64_t c1) {
    cpu::adamw_step_chunks(tensors, ntensors, launch.group, c0, c1);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora_ext, CPU, m) { m.impl("adamw_step_", &adamw_step_cpu); }

}  // namespace qlora::ops
