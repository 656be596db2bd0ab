// Schema of the counter-based dropout op (implementations: dropout_cpu_ops.cpp, dropout_cuda_ops.cpp).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(qlora_ext, m) {
  // y = x * mask / (1 - p), mask a pure function of (seed, element index in x's row-major order): calling it
  // again with the same seed on the gradient is the backward pass, so no mask is stored. x: float32, float64,
  // float16 or bfloat16 on any device; seed: an int64 tensor of one element, on the CPU or (CUDA x) on x's
  // device, where the kernel reads it (graph-safe); p in [0, 1]. y is contiguous.
  m.def("dropout(Tensor x, Tensor seed, float p) -> Tensor");
}
