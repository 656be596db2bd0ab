// Schemas of the 4-bit linear ops (implementations: linear_4bit_cpu_ops.cpp, linear_4bit_cuda_ops.cpp).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(qlora_ext, m) {
  // y [..., N] = x [..., K] @ W^T (+ bias [N]), W [N, K] stored as above (K a multiple of blocksize);
  // y has x's dtype. float32 is computed in float32; float64 is accepted on CPU (gradcheck).
  m.def(
      "linear_4bit(Tensor x, Tensor codes, Tensor absmax, Tensor? absmax_scale, Tensor? absmax_mean, "
      "Tensor? bias, int blocksize, str quant_type, int out_features) -> Tensor");
  // dx [..., K] = grad_out [..., N] @ W: the input gradient of linear_4bit (W is frozen: no weight gradient).
  m.def(
      "linear_4bit_grad_input(Tensor grad_out, Tensor codes, Tensor absmax, Tensor? absmax_scale, "
      "Tensor? absmax_mean, int blocksize, str quant_type, int in_features) -> Tensor");
}
