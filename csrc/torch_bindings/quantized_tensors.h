// A quantized tensor's buffers made ready for the torch-free kernels: contiguous, codes 16-byte aligned
// (the kernels read them in wide words), and the AbsmaxSource that points into them. Shared by the CUDA
// op implementations (dequantize, linear_4bit).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

#include "../kernels/quant_format.h"

namespace qlora::ops {

// Contiguous, and copied once more if its storage offset leaves it off a 16-byte boundary.
inline at::Tensor aligned_contiguous(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

struct QuantizedTensors {
  at::Tensor codes, absmax, scale, mean;  // kept alive while the kernels read them
  AbsmaxSource source;

  QuantizedTensors(const at::Tensor& codes_in, const at::Tensor& absmax_in,
                   const std::optional<at::Tensor>& scale_in, const std::optional<at::Tensor>& mean_in,
                   bool double_quant)
      : codes(aligned_contiguous(codes_in)), absmax(absmax_in.contiguous()) {
    if (double_quant) {
      scale = scale_in->contiguous();
      mean = mean_in->contiguous();
      source.fp8 = absmax.data_ptr<uint8_t>();
      source.chunk_scale = scale.data_ptr<float>();
      source.mean = mean.data_ptr<float>();
    } else {
      source.f32 = absmax.data_ptr<float>();
    }
  }
};

}  // namespace qlora::ops
