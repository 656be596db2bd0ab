// Argument parsing and checking shared by the CPU and CUDA op implementations: every bad input becomes
// an error that names the argument and what was expected.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>

#include "../kernels/numeric_core.h"

namespace qlora::ops {

inline QuantType parse_quant_type(const std::string& name) {
  if (name == "nf4") return QuantType::NF4;
  if (name == "fp4") return QuantType::FP4;
  if (name == "int4") return QuantType::INT4;
  TORCH_CHECK_VALUE(false, "quant_type must be 'nf4', 'fp4' or 'int4', got '", name, "'");
}

inline void check_blocksize(int64_t blocksize) {
  TORCH_CHECK_VALUE(is_supported_blocksize(blocksize), "blocksize must be 64, 128 or 256, got ", blocksize);
}

inline FloatFormat float_format(at::ScalarType t, const char* what) {
  switch (t) {
    case at::kFloat: return FloatFormat::F32;
    case at::kHalf: return FloatFormat::F16;
    case at::kBFloat16: return FloatFormat::BF16;
    default: TORCH_CHECK_TYPE(false, what, " must be float32, float16 or bfloat16, got ", t);
  }
}

inline void check_device(const at::Tensor& t, const char* name, c10::DeviceType expected) {
  TORCH_CHECK(t.device().type() == expected, name, " must be on ", c10::DeviceTypeName(expected, true),
              " like the other inputs, got ", t.device());
}

// The exact device, index included: pointers from two GPUs must never reach one kernel.
inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on the same device as ", ref_name, " (", ref.device(),
              "), got ", t.device());
}

inline void check_dtype(const at::Tensor& t, const char* name, at::ScalarType expected) {
  TORCH_CHECK_TYPE(t.scalar_type() == expected, name, " must be ", expected, ", got ", t.scalar_type());
}

inline void check_numel(const at::Tensor& t, const char* name, int64_t expected, const char* why) {
  TORCH_CHECK_VALUE(t.numel() == expected, name, " must have ", expected, " elements (", why, "), got ",
                    t.numel());
}

inline void check_absmax_fp8_args(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& mean,
                           c10::DeviceType device) {
  check_dtype(codes, "codes", at::kByte);
  check_device(codes, "codes", device);
  check_dtype(scale, "scale", at::kFloat);
  check_same_device(scale, "scale", codes, "codes");
  check_numel(scale, "scale", num_chunks(codes.numel()), "one per chunk of 256 codes");
  check_dtype(mean, "mean", at::kFloat);
  check_same_device(mean, "mean", codes, "codes");
  check_numel(mean, "mean", 1, "one mean per tensor");
}

// The checked inputs of dequantize_4bit, shared by both devices.
struct DequantArgs {
  int64_t numel = 1;
  int64_t nblocks = 0;
  bool double_quant = false;
  FloatFormat out_format = FloatFormat::F32;
  QuantType quant_type = QuantType::NF4;
};

inline DequantArgs check_dequantize_args(const at::Tensor& codes, const at::Tensor& absmax,
                                         const std::optional<at::Tensor>& chunk_scale,
                                         const std::optional<at::Tensor>& mean, int64_t blocksize,
                                         const std::string& quant_type, at::IntArrayRef shape,
                                         at::ScalarType dtype, c10::DeviceType device) {
  DequantArgs a;
  a.quant_type = parse_quant_type(quant_type);
  check_blocksize(blocksize);
  a.out_format = float_format(dtype, "dtype");
  for (int64_t d : shape) {
    TORCH_CHECK_VALUE(d >= 0, "shape must not have negative sizes, got ", shape);
    a.numel *= d;
  }
  a.nblocks = num_blocks(a.numel, blocksize);
  check_dtype(codes, "codes", at::kByte);
  check_device(codes, "codes", device);
  check_numel(codes, "codes", packed_bytes(a.numel), "two 4-bit codes per byte for the given shape");
  check_same_device(absmax, "absmax", codes, "codes");
  check_numel(absmax, "absmax", a.nblocks, "one per block of blocksize elements");
  a.double_quant = chunk_scale.has_value() || mean.has_value();
  if (a.double_quant) {
    TORCH_CHECK_VALUE(chunk_scale.has_value() && mean.has_value(),
                      "double quantization needs both absmax_scale and absmax_mean");
    check_dtype(absmax, "absmax (FP8 E4M3 codes, double quantized)", at::kByte);
    check_dtype(*chunk_scale, "absmax_scale", at::kFloat);
    check_same_device(*chunk_scale, "absmax_scale", codes, "codes");
    check_numel(*chunk_scale, "absmax_scale", num_chunks(a.nblocks), "one per chunk of 256 absmax");
    check_dtype(*mean, "absmax_mean", at::kFloat);
    check_same_device(*mean, "absmax_mean", codes, "codes");
    check_numel(*mean, "absmax_mean", 1, "one mean per tensor");
  } else {
    TORCH_CHECK_TYPE(absmax.scalar_type() == at::kFloat,
                     "absmax must be float32 (or uint8 FP8 codes with absmax_scale and absmax_mean), got ",
                     absmax.scalar_type());
  }
  return a;
}

}  // namespace qlora::ops
