// Schemas of the optimizer ops (implementations: optim_cpu_ops.cpp, optim_cuda_ops.cpp).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(qlora_ext, m) {
  // One AdamW step (torch.optim.AdamW's update: decoupled weight decay, bias correction) of every tensor of
  // a parameter group, in place. params: float32/float16/bfloat16, dense, all on one device; grads: like
  // their params (dtype, shape, strides); exp_avgs/exp_avg_sqs: float32 with their params' shape and
  // strides; steps: CPU float32 scalars, incremented here before the bias corrections use them.
  m.def(
      "adamw_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] steps, float lr, float beta1, float beta2, float eps, float weight_decay, bool maximize) -> ()");
}
