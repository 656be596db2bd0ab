// Declares the qlora_ext ops once (schemas) and the Python module qlora_ext._C with the build facts.
// Device implementations live in *_cpu_ops.cpp and *_cuda_ops.cpp.
#include <Python.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>
#include <torch/version.h>

#include <string>
#include <vector>

#include "../kernels/quantize_cpu.h"
#include "op_checks.h"

#if defined(QLORA_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

#define QLORA_STR_(x) #x
#define QLORA_STR(x) QLORA_STR_(x)

TORCH_LIBRARY(qlora_ext, m) {
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

namespace {

pybind11::dict build_info() {
  pybind11::dict d;
#if defined(QLORA_WITH_CUDA)
  d["cuda"] = true;
  std::string archs = QLORA_STR(QLORA_CUDA_ARCHS);
  for (char& c : archs) c = c == '_' ? ';' : c;  // setup.py encodes "8.0;9.0+PTX" as 8.0_9.0_PTX
  for (size_t at = archs.find(";PTX"); at != std::string::npos; at = archs.find(";PTX")) archs.replace(at, 1, "+");
  d["cuda_arch_list"] = archs;
  d["cuda_runtime_version"] = CUDART_VERSION;
#else
  d["cuda"] = false;
  d["cuda_arch_list"] = "";
  d["cuda_runtime_version"] = 0;
#endif
  d["torch_version"] = std::string(TORCH_VERSION);
  d["cpu_simd"] = qlora::cpu::simd_enabled();
  return d;
}

std::vector<float> code_table(const std::string& quant_type) {
  const float* t = qlora::code_table(qlora::ops::parse_quant_type(quant_type));
  return std::vector<float>(t, t + 16);
}

// Test hook: the FP8 E4M3 encoder of the numeric core (the one both kernels use), on host floats.
std::vector<int> fp8_e4m3_encode(const std::vector<float>& values) {
  std::vector<int> out;
  out.reserve(values.size());
  for (float v : values) out.push_back(qlora::fp8_e4m3_encode(v));
  return out;
}

std::vector<float> fp8_e4m3_decode(const std::vector<int>& codes) {
  std::vector<float> out;
  out.reserve(codes.size());
  for (int c : codes) out.push_back(qlora::fp8_e4m3_decode(uint8_t(c)));
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "qlora_ext native extension: ops are registered under torch.ops.qlora_ext";
  m.def("build_info", &build_info, "Facts about how this extension was built");
  m.def("code_table", &code_table, "The 16 float32 values of a 4-bit code table, by code", pybind11::arg("quant_type"));
  m.def("fp8_e4m3_encode", &fp8_e4m3_encode, "FP8 E4M3 codes of float32 values (numeric core, host)");
  m.def("fp8_e4m3_decode", &fp8_e4m3_decode, "float32 values of FP8 E4M3 codes (numeric core, host)");
  m.def("set_cpu_simd", &qlora::cpu::set_simd_enabled, "Use (True) or bypass (False) the AVX2 CPU paths");
}
