// CPU implementation of linear_4bit and its input gradient: W is dequantized a tile of rows at a time
// (about a million elements, so the dense weight never exists whole) and multiplied with ATen's GEMM; a forward
// with a few rows of x (generation) decodes W in registers instead (csrc/kernels/linear_4bit_cpu.h).
#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>

#include "../kernels/linear_4bit_cpu.h"
#include "../kernels/quantize_cpu.h"
#include "linear_4bit_common.h"

namespace qlora::ops {
namespace {

constexpr int64_t kTileElements = 1 << 20;

// Dequantizes weight rows [r0, r1) into a new [r1 - r0, K] tensor of dtype (float64 via float32).
class WeightTiles {
 public:
  WeightTiles(const at::Tensor& codes, const at::Tensor& absmax, const std::optional<at::Tensor>& scale,
              const std::optional<at::Tensor>& mean, int64_t blocksize, const Linear4bitArgs& a)
      : codes_(codes.contiguous()), absmax_(absmax.contiguous()), blocksize_(blocksize), a_(a),
        cb_(make_codebook(a.quant_type)) {
    if (a.double_quant) {
      scale_ = scale->contiguous();
      mean_value_ = mean->item<float>();
      src_.fp8 = absmax_.data_ptr<uint8_t>();
      src_.chunk_scale = scale_.data_ptr<float>();
      src_.mean = &mean_value_;
    } else {
      src_.f32 = absmax_.data_ptr<float>();
    }
  }

  int64_t rows_per_tile() const { return std::clamp<int64_t>(kTileElements / a_.k, 1, a_.n); }
  const uint8_t* codes() const { return codes_.data_ptr<uint8_t>(); }
  const AbsmaxSource& absmax() const { return src_; }
  const CodeBook& code_book() const { return cb_; }
  int64_t blocksize() const { return blocksize_; }

  at::Tensor rows(int64_t r0, int64_t r1, at::ScalarType dtype) const {
    const at::ScalarType dq = dtype == at::kDouble ? at::kFloat : dtype;
    at::Tensor tile = at::empty({r1 - r0, a_.k}, codes_.options().dtype(dq));
    const FloatFormat fmt = float_format(dq, "dtype");
    void* out = tile.data_ptr();
    const uint8_t* codes = codes_.data_ptr<uint8_t>();
    // Rows are split over threads; each thread writes its own rows of the tile.
    at::parallel_for(r0, r1, std::max<int64_t>(1, 65536 / a_.k), [&](int64_t s0, int64_t s1) {
      char* dst = static_cast<char*>(out) + (s0 - r0) * a_.k * (fmt == FloatFormat::F32 ? 4 : 2);
      cpu::dequantize_4bit_rows(codes, src_, a_.n, a_.k, int(blocksize_), cb_, dst, fmt, s0, s1);
    });
    return dtype == at::kDouble ? tile.to(at::kDouble) : tile;
  }

 private:
  at::Tensor codes_, absmax_, scale_;
  float mean_value_ = 0.0f;
  AbsmaxSource src_;
  int64_t blocksize_;
  Linear4bitArgs a_;
  CodeBook cb_;
};

// y [m, n] for m <= kSmallMRows rows of x (not float64): W dequantized to x's dtype in registers, float32
// sums, rounded once to x's dtype.
at::Tensor linear_4bit_small_m(const at::Tensor& x2, const WeightTiles& w, const std::optional<at::Tensor>& bias,
                               const Linear4bitArgs& a) {
  const int64_t m = x2.size(0);
  const at::Tensor xf = x2.to(at::kFloat).contiguous();
  at::Tensor x_lookup = at::empty({m, a.k}, xf.options());
  cpu::order_x_for_lookup(xf.data_ptr<float>(), m, a.k, x_lookup.data_ptr<float>());
  const float* x_ordered = x_lookup.data_ptr<float>();
  at::Tensor bias_f;
  if (bias.has_value()) bias_f = bias->to(at::kFloat).contiguous();
  const float* bias_ptr = bias.has_value() ? bias_f.data_ptr<float>() : nullptr;
  at::Tensor y = at::empty({m, a.n}, xf.options());
  float* out = y.data_ptr<float>();
  const FloatFormat weight_format = float_format(x2.scalar_type(), "x");
  at::parallel_for(0, a.n, std::max<int64_t>(1, 16384 / a.k), [&](int64_t r0, int64_t r1) {
    cpu::linear_4bit_small_m_rows(x_ordered, m, a.k, weight_format, w.codes(), w.absmax(), int(w.blocksize()),
                                  w.code_book(), bias_ptr, out, a.n, r0, r1);
  });
  return x2.scalar_type() == at::kFloat ? y : y.to(x2.scalar_type());
}

at::Tensor linear_4bit_cpu(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& absmax,
                           const std::optional<at::Tensor>& absmax_scale, const std::optional<at::Tensor>& absmax_mean,
                           const std::optional<at::Tensor>& bias, int64_t blocksize, const std::string& quant_type,
                           int64_t out_features) {
  const Linear4bitArgs a = check_linear_4bit_args(x, "x", codes, absmax, absmax_scale, absmax_mean, blocksize,
                                                  quant_type, out_features, x.dim() ? x.size(-1) : 0,
                                                  c10::DeviceType::CPU);
  check_bias(bias, x, a.n);
  const at::Tensor x2 = x.reshape({-1, a.k}).contiguous();
  const WeightTiles w(codes, absmax, absmax_scale, absmax_mean, blocksize, a);
  if (x2.size(0) > 0 && x2.size(0) <= cpu::kSmallMRows && x2.scalar_type() != at::kDouble &&
      cpu::linear_4bit_small_m_available()) {
    return linear_4bit_small_m(x2, w, bias, a).view(with_last_dim(x, a.n));
  }
  if (w.rows_per_tile() >= a.n) {  // one tile (most layers): the GEMM writes y itself
    const at::Tensor tile = w.rows(0, a.n, x2.scalar_type());
    const at::Tensor y = bias.has_value() ? at::addmm(*bias, x2, tile.t()) : at::mm(x2, tile.t());
    return y.view(with_last_dim(x, a.n));
  }
  at::Tensor y = at::empty({x2.size(0), a.n}, x2.options());
  for (int64_t r0 = 0; r0 < a.n; r0 += w.rows_per_tile()) {
    const int64_t r1 = std::min(a.n, r0 + w.rows_per_tile());
    const at::Tensor tile = w.rows(r0, r1, x2.scalar_type());
    if (bias.has_value()) {
      y.narrow(1, r0, r1 - r0).copy_(at::addmm(bias->narrow(0, r0, r1 - r0), x2, tile.t()));
    } else {
      y.narrow(1, r0, r1 - r0).copy_(at::mm(x2, tile.t()));
    }
  }
  return y.view(with_last_dim(x, a.n));
}

at::Tensor linear_4bit_grad_input_cpu(const at::Tensor& grad_out, const at::Tensor& codes, const at::Tensor& absmax,
                                      const std::optional<at::Tensor>& absmax_scale,
                                      const std::optional<at::Tensor>& absmax_mean, int64_t blocksize,
                                      const std::string& quant_type, int64_t in_features) {
  const Linear4bitArgs a = check_linear_4bit_args(grad_out, "grad_out", codes, absmax, absmax_scale, absmax_mean,
                                                  blocksize, quant_type, grad_out.dim() ? grad_out.size(-1) : 0,
                                                  in_features, c10::DeviceType::CPU);
  const at::Tensor dy = grad_out.reshape({-1, a.n}).contiguous();
  // Accumulate over the N tiles in float32 (float64 for float64), round once at the end.
  const at::ScalarType acc_t = dy.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const WeightTiles w(codes, absmax, absmax_scale, absmax_mean, blocksize, a);
  at::Tensor acc;  // the first tile's product starts the sum (no zero fill), later tiles add into it
  for (int64_t r0 = 0; r0 < a.n; r0 += w.rows_per_tile()) {
    const int64_t r1 = std::min(a.n, r0 + w.rows_per_tile());
    const at::Tensor dy_tile = dy.narrow(1, r0, r1 - r0).to(acc_t), w_tile = w.rows(r0, r1, acc_t);
    if (r0 == 0) {
      acc = at::mm(dy_tile, w_tile);
    } else {
      acc.addmm_(dy_tile, w_tile);
    }
  }
  return acc.to(dy.scalar_type()).view(with_last_dim(grad_out, a.k));
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora_ext, CPU, m) {
  m.impl("linear_4bit", &linear_4bit_cpu);
  m.impl("linear_4bit_grad_input", &linear_4bit_grad_input_cpu);
}

}  // namespace qlora::ops
