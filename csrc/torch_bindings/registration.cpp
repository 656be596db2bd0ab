// Declares the qlora_ext op library and the Python module qlora_ext._C with the build facts.
// Schemas live in *_schema.cpp, device implementations in *_cpu_ops.cpp and *_cuda_ops.cpp.
#include <Python.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>
#include <torch/version.h>

#include <string>
#include <vector>

#include "../kernels/adamw8bit_core.h"
#include "../kernels/quantize_cpu.h"
#include "linear_backend.h"
#include "op_checks.h"

#if defined(QLORA_WITH_CUDA)
#include <cuda_runtime_api.h>

#include "paged_memory.h"
#endif

#define QLORA_STR_(x) #x
#define QLORA_STR(x) QLORA_STR_(x)

// The library itself; each op family declares its schemas with TORCH_LIBRARY_FRAGMENT in its own
// *_schema.cpp file, next to its implementations.
TORCH_LIBRARY(qlora_ext, m) {}

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
  d["cpu_avx512"] = qlora::cpu::avx512_enabled();
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

// The 256 float32 values of the 8-bit optimizer states' dynamic map, by code (adamw8bit_core.h).
std::vector<float> dynamic_map(bool is_signed) {
  std::vector<float> out;
  out.reserve(qlora::kDynamicMapSize);
  for (int c = 0; c < qlora::kDynamicMapSize; ++c) out.push_back(qlora::dynamic_map_value(c, is_signed));
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "qlora_ext native extension: ops are registered under torch.ops.qlora_ext";
  m.def("build_info", &build_info, "Facts about how this extension was built");
  m.def("code_table", &code_table, "The 16 float32 values of a 4-bit code table, by code", pybind11::arg("quant_type"));
  m.def("fp8_e4m3_encode", &fp8_e4m3_encode, "FP8 E4M3 codes of float32 values (numeric core, host)");
  m.def("fp8_e4m3_decode", &fp8_e4m3_decode, "float32 values of FP8 E4M3 codes (numeric core, host)");
  m.def("dynamic_map", &dynamic_map,
        "The 256 float32 values of the 8-bit optimizer states' dynamic map by code: signed (exp_avg) or "
        "unsigned (exp_avg_sq)", pybind11::arg("is_signed"));
  m.attr("ADAMW8BIT_BLOCK") = qlora::kAdamW8bitBlock;
  m.def("set_linear_backend", &qlora::ops::set_linear_backend,
        "CUDA linear_4bit implementation: 'auto' (by shape), 'fused' (fused kernels where they apply) or "
        "'dequant' (dequantize + cuBLAS)", pybind11::arg("backend"));
  m.def("linear_backend", &qlora::ops::linear_backend_name, "The current linear_4bit backend");
  m.def("set_cpu_simd", &qlora::cpu::set_simd_enabled, "Use (True) or bypass (False) the AVX2 CPU paths");
  m.def("set_cpu_avx512", &qlora::cpu::set_avx512_enabled, "Use (True) or bypass (False) the AVX-512 CPU paths");
#if defined(QLORA_WITH_CUDA)
  qlora::ops::register_paged_memory(m);  // managed-memory arenas of the paged optimizer
#endif
}
