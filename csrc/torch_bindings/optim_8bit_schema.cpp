// Schemas of the 8-bit-state AdamW ops (implementations: optim_8bit_cpu_ops.cpp, optim_8bit_cuda_ops.cpp;
// the format: csrc/kernels/adamw8bit_core.h).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(qlora_ext, m) {
  // One AdamW step (torch.optim.AdamW's update, computed in float32) of every tensor of a parameter group,
  // with blockwise 8-bit states, in place. params: float32/float16/bfloat16, non-overlapping and dense, all on
  // one device; grads: like their params (dtype, shape, strides); exp_avg_codes / exp_avg_sq_codes: uint8
  // with their params' shape and strides (signed / unsigned dynamic map codes); exp_avg_absmax /
  // exp_avg_sq_absmax: float32, contiguous, ceil(numel / 256) each (blocks of 256 elements in memory order);
  // steps: CPU float32 scalars, incremented here.
  m.def(
      "adamw8bit_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avg_codes, "
      "Tensor(c!)[] exp_avg_absmax, Tensor(d!)[] exp_avg_sq_codes, Tensor(e!)[] exp_avg_sq_absmax, "
      "Tensor(f!)[] steps, float lr, float beta1, float beta2, float eps, float weight_decay, bool maximize) -> ()");
  // Blockwise quantization with a dynamic map (the optimizer's state format): x float32, any shape, read in
  // row-major order. Returns codes (uint8, x's shape) and absmax (float32 [ceil(numel / 256)]).
  m.def("quantize_8bit_dynamic(Tensor x, bool is_signed) -> (Tensor codes, Tensor absmax)");
  // The inverse: float32 with codes' shape (row-major blocks), map[code] * absmax of the code's block.
  m.def("dequantize_8bit_dynamic(Tensor codes, Tensor absmax, bool is_signed) -> Tensor");
}
