// CUDA implementations of the quantization ops: check inputs, allocate outputs, launch the torch-free
// kernels of csrc/kernels/quantize_cuda.cu on PyTorch's current stream.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "../kernels/quantize_cuda.h"
#include "op_checks.h"
#include "quantized_tensors.h"

namespace qlora::ops {
namespace {

// Every kernel uses bf16 and (later) bf16 tensor cores: refuse older GPUs with a clear message.
void check_compute_capability(const at::Tensor& t) {
  const cudaDeviceProp* p = at::cuda::getDeviceProperties(t.device().index());
  TORCH_CHECK(p->major >= 8, "qlora_ext needs a GPU of compute capability 8.0 or newer (bf16 tensor cores); ",
              p->name, " on ", t.device(), " is ", p->major, ".", p->minor);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_4bit_cuda(const at::Tensor& x, int64_t blocksize,
                                                                  const std::string& quant_type) {
  const QuantType qt = parse_quant_type(quant_type);
  check_blocksize(blocksize);
  const FloatFormat fmt = float_format(x.scalar_type(), "x");
  check_device(x, "x", c10::DeviceType::CUDA);
  check_compute_capability(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = aligned_contiguous(x);
  const int64_t numel = xc.numel();
  at::Tensor codes = at::empty({packed_bytes(numel)}, xc.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({num_blocks(numel, blocksize)}, xc.options().dtype(at::kFloat));
  at::Tensor count = at::zeros({1}, xc.options().dtype(at::kInt));
  C10_CUDA_CHECK(cuda::quantize_4bit(xc.data_ptr(), fmt, numel, int(blocksize), make_codebook(qt),
                                     codes.data_ptr<uint8_t>(), absmax.data_ptr<float>(), count.data_ptr<int32_t>(),
                                     at::cuda::getCurrentCUDAStream()));
  return {codes, absmax, count};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_absmax_fp8_cuda(const at::Tensor& absmax) {
  check_dtype(absmax, "absmax", at::kFloat);
  check_device(absmax, "absmax", c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(absmax.device());
  const at::Tensor a = absmax.contiguous();
  const int64_t n = a.numel(), nchunks = num_chunks(n);
  at::Tensor codes = at::empty({n}, a.options().dtype(at::kByte));  // FP8 E4M3 bits
  at::Tensor scale = at::empty({nchunks}, a.options());
  at::Tensor mean = at::zeros({1}, a.options());
  at::Tensor sums = at::empty({nchunks}, a.options().dtype(at::kDouble));
  C10_CUDA_CHECK(cuda::quantize_absmax_fp8(a.data_ptr<float>(), n, static_cast<uint8_t*>(codes.data_ptr()),
                                           scale.data_ptr<float>(), mean.data_ptr<float>(), sums.data_ptr<double>(),
                                           at::cuda::getCurrentCUDAStream()));
  return {codes, scale, mean};
}

at::Tensor dequantize_absmax_fp8_cuda(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& mean) {
  check_absmax_fp8_args(codes, scale, mean, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(codes.device());
  const at::Tensor c = codes.contiguous(), s = scale.contiguous();
  at::Tensor out = at::empty(codes.sizes(), c.options().dtype(at::kFloat));
  C10_CUDA_CHECK(cuda::dequantize_absmax_fp8(static_cast<const uint8_t*>(c.data_ptr()), s.data_ptr<float>(),
                                             mean.data_ptr<float>(), c.numel(), out.data_ptr<float>(),
                                             at::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor dequantize_4bit_cuda(const at::Tensor& codes, const at::Tensor& absmax,
                                const std::optional<at::Tensor>& chunk_scale, const std::optional<at::Tensor>& mean,
                                int64_t blocksize, const std::string& quant_type, at::IntArrayRef shape,
                                at::ScalarType dtype) {
  const DequantArgs a = check_dequantize_args(codes, absmax, chunk_scale, mean, blocksize, quant_type, shape, dtype,
                                              c10::DeviceType::CUDA);
  check_compute_capability(codes);
  const c10::cuda::CUDAGuard guard(codes.device());
  const QuantizedTensors q(codes, absmax, chunk_scale, mean, a.double_quant);
  at::Tensor out = at::empty(shape, q.codes.options().dtype(dtype));
  C10_CUDA_CHECK(cuda::dequantize_4bit(q.codes.data_ptr<uint8_t>(), q.source, a.numel, int(blocksize),
                                       make_codebook(a.quant_type), out.data_ptr(), a.out_format,
                                       at::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora_ext, CUDA, m) {
  m.impl("quantize_4bit", &quantize_4bit_cuda);
  m.impl("quantize_absmax_fp8", &quantize_absmax_fp8_cuda);
  m.impl("dequantize_absmax_fp8", &dequantize_absmax_fp8_cuda);
  m.impl("dequantize_4bit", &dequantize_4bit_cuda);
}

}  // namespace qlora::ops
