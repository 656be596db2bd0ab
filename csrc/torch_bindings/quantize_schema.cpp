// Schemas of the quantization ops (implementations: quantize_cpu_ops.cpp, quantize_cuda_ops.cpp).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(qlora_ext, m) {
  // Packs x (any shape, float32/float16/bfloat16) into 4-bit codes: codes uint8 [ceil(numel/2)],
  // absmax float32 [ceil(numel/blocksize)], nonfinite int32 [1] (how many elements were inf/NaN).
  m.def("quantize_4bit(Tensor x, int blocksize, str quant_type) -> (Tensor codes, Tensor absmax, Tensor nonfinite)");
  // Double quantization of float32 absmax: codes uint8 [n] holding float8_e4m3fn bit patterns (view them with
  // .view(torch.float8_e4m3fn)), scale float32 [ceil(n/256)], mean float32 [1].
  m.def("quantize_absmax_fp8(Tensor absmax) -> (Tensor codes, Tensor scale, Tensor mean)");
  m.def("dequantize_absmax_fp8(Tensor codes, Tensor scale, Tensor mean) -> Tensor");
  // absmax is float32 (absmax_scale/absmax_mean None), or uint8 FP8 codes with absmax_scale and absmax_mean.
  m.def(
      "dequantize_4bit(Tensor codes, Tensor absmax, Tensor? absmax_scale, Tensor? absmax_mean, int blocksize, "
      "str quant_type, SymInt[] shape, ScalarType dtype) -> Tensor");
}
