// CPU implementations of the quantization ops: check inputs, split the block range over threads,
// call the torch-free kernels in csrc/kernels/quantize_cpu.cpp.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <atomic>
#include <tuple>

#include "../kernels/quantize_cpu.h"
#include "op_checks.h"

namespace qlora::ops {
namespace {

// Blocks per parallel task: large enough that scheduling costs nothing next to the work.
constexpr int64_t kGrainBlocks = 256;

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_4bit_cpu(const at::Tensor& x, int64_t blocksize,
                                                                 const std::string& quant_type) {
  const QuantType qt = parse_quant_type(quant_type);
  check_blocksize(blocksize);
  const FloatFormat fmt = float_format(x.scalar_type(), "x");
  check_device(x, "x", c10::DeviceType::CPU);
  const at::Tensor xc = x.contiguous();
  const int64_t numel = xc.numel(), nblocks = num_blocks(numel, blocksize);
  at::Tensor codes = at::empty({packed_bytes(numel)}, xc.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({nblocks}, xc.options().dtype(at::kFloat));
  const CodeBook cb = make_codebook(qt);
  std::atomic<int64_t> nonfinite{0};
  const void* src = xc.data_ptr();
  uint8_t* codes_ptr = codes.data_ptr<uint8_t>();
  float* absmax_ptr = absmax.data_ptr<float>();
  at::parallel_for(0, nblocks, kGrainBlocks, [&](int64_t b0, int64_t b1) {
    nonfinite += cpu::quantize_4bit_blocks(src, fmt, numel, int(blocksize), cb, codes_ptr, absmax_ptr, b0, b1);
  });
  at::Tensor count = at::zeros({1}, xc.options().dtype(at::kInt));
  count.fill_(nonfinite.load());
  return {codes, absmax, count};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_absmax_fp8_cpu(const at::Tensor& absmax) {
  check_dtype(absmax, "absmax", at::kFloat);
  check_device(absmax, "absmax", c10::DeviceType::CPU);
  const at::Tensor a = absmax.contiguous();
  const int64_t n = a.numel(), nchunks = num_chunks(n);
  at::Tensor codes = at::empty({n}, a.options().dtype(at::kByte));  // FP8 E4M3 bits
  at::Tensor scale = at::empty({nchunks}, a.options());
  at::Tensor mean = at::zeros({1}, a.options());
  if (n == 0) return {codes, scale, mean};
  const float* ap = a.data_ptr<float>();
  std::vector<double> sums(nchunks);
  at::parallel_for(0, nchunks, 64, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) sums[c] = cpu::absmax_chunk_sum(ap, n, c);
  });
  const float m = cpu::absmax_mean(sums.data(), nchunks, n);
  mean.fill_(m);
  uint8_t* cp = static_cast<uint8_t*>(codes.data_ptr());
  float* sp = scale.data_ptr<float>();
  at::parallel_for(0, nchunks, 64, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) cpu::absmax_encode_chunk(ap, n, c, m, cp, sp);
  });
  return {codes, scale, mean};
}

at::Tensor dequantize_absmax_fp8_cpu(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& mean) {
  check_absmax_fp8_args(codes, scale, mean, c10::DeviceType::CPU);
  const at::Tensor c = codes.contiguous(), s = scale.contiguous();
  at::Tensor out = at::empty(codes.sizes(), s.options());
  cpu::absmax_decode(static_cast<const uint8_t*>(c.data_ptr()), s.data_ptr<float>(), mean.item<float>(), c.numel(),
                     out.data_ptr<float>());
  return out;
}

at::Tensor dequantize_4bit_cpu(const at::Tensor& codes, const at::Tensor& absmax,
                               const std::optional<at::Tensor>& chunk_scale, const std::optional<at::Tensor>& mean,
                               int64_t blocksize, const std::string& quant_type, at::IntArrayRef shape,
                               at::ScalarType dtype) {
  const DequantArgs a = check_dequantize_args(codes, absmax, chunk_scale, mean, blocksize, quant_type, shape, dtype,
                                              c10::DeviceType::CPU);
  const at::Tensor c = codes.contiguous(), am = absmax.contiguous();
  at::Tensor scale_c, mean_c;
  AbsmaxSource src;
  float mean_value = 0.0f;
  if (a.double_quant) {
    scale_c = chunk_scale->contiguous();
    mean_value = mean->item<float>();
    src.fp8 = static_cast<const uint8_t*>(am.data_ptr());
    src.chunk_scale = scale_c.data_ptr<float>();
    src.mean = &mean_value;
  } else {
    src.f32 = am.data_ptr<float>();
  }
  at::Tensor out = at::empty(shape, c.options().dtype(dtype));
  const CodeBook cb = make_codebook(a.quant_type);
  const uint8_t* cp = c.data_ptr<uint8_t>();
  void* op = out.data_ptr();
  at::parallel_for(0, a.nblocks, kGrainBlocks, [&](int64_t b0, int64_t b1) {
    cpu::dequantize_4bit_blocks(cp, src, a.numel, int(blocksize), cb, op, a.out_format, b0, b1);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora_ext, CPU, m) {
  m.impl("quantize_4bit", &quantize_4bit_cpu);
  m.impl("quantize_absmax_fp8", &quantize_absmax_fp8_cpu);
  m.impl("dequantize_absmax_fp8", &dequantize_absmax_fp8_cpu);
  m.impl("dequantize_4bit", &dequantize_4bit_cpu);
}

}  // namespace qlora::ops
