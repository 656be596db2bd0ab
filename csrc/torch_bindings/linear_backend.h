// Which CUDA implementation linear_4bit uses: a process-wide switch, set from Python with
// qlora_ext.set_linear_backend(). "auto" is the dispatcher's choice by shape; "fused" forces the fused
// kernels where they apply (bf16/fp16, blocksize 64: small-M kernels for M <= 64, large-M kernels above);
// "dequant" forces dequantize + cuBLAS.
#pragma once

#include <string>

namespace qlora::ops {

enum class LinearBackend : int { Auto = 0, Fused = 1, Dequant = 2 };

LinearBackend linear_backend();
void set_linear_backend(const std::string& name);
std::string linear_backend_name();

}  // namespace qlora::ops
