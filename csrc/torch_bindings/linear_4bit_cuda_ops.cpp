// CUDA implementation of linear_4bit and its input gradient, with the dispatcher between
// - the fused kernels (bf16/fp16, blocksize 64): small M (csrc/kernels/linear_4bit_cuda.cu, M <= 64) and
//   large M (M > 64: csrc/kernels/linear_4bit_hopper_cuda.cu with wgmma on Hopper when the build has sm_90a,
//   else csrc/kernels/linear_4bit_large_cuda.cu with mma.sync), and
// - dequantize + cuBLAS (as bitsandbytes does for training: the dense W exists transiently in x's dtype).
// "auto" routes everything to dequantize + cuBLAS until the fused kernels have been validated and
// measured faster on a GPU (bench/bench_linear_cuda.py); set_linear_backend("fused") forces them.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>

#include "../kernels/linear_4bit_cuda.h"
#include "../kernels/linear_4bit_large_layout.h"
#include "../kernels/quantize_cuda.h"
#include "linear_backend.h"
#include "linear_4bit_common.h"
#include "quantized_tensors.h"

namespace qlora::ops {
namespace {

at::Tensor dequantize_weight(const at::Tensor& codes, const at::Tensor& absmax,
                             const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& mean,
                             int64_t blocksize, const Linear4bitArgs& a, at::ScalarType dtype) {
  const QuantizedTensors q(codes, absmax, scale, mean, a.double_quant);
  at::Tensor w = at::empty({a.n, a.k}, q.codes.options().dtype(dtype));
  C10_CUDA_CHECK(cuda::dequantize_4bit(q.codes.data_ptr<uint8_t>(), q.source, a.n * a.k, int(blocksize),
                                       make_codebook(a.quant_type), w.data_ptr(), float_format(dtype, "x"),
                                       at::cuda::getCurrentCUDAStream()));
  return w;
}

// Which fused kernel family serves a call, if any: "auto" stays on dequantize + cuBLAS for every M until the
// fused kernels are validated and measured faster on a GPU.
enum class FusedKind { None, SmallM, LargeM, LargeMHopper };

// QLORA_DISABLE_WGMMA=1 keeps "fused" on the mma.sync large-M kernels even on Hopper: bench/gpu_check.sh sets it
// when the wgmma smoke test fails, so that one broken kernel does not poison the whole CUDA test run (a device
// fault is sticky for the process).
bool wgmma_disabled() {
  static const bool disabled = [] {
    const char* v = std::getenv("QLORA_DISABLE_WGMMA");
    return v != nullptr && std::string(v) == "1";
  }();
  return disabled;
}

bool use_hopper(c10::DeviceIndex device) {
  return !wgmma_disabled() && cuda::hopper_gemm_available(device, at::cuda::getCurrentCUDAStream(device).stream());
}

FusedKind fused_kind(int64_t m, at::ScalarType dtype, int64_t blocksize, const Linear4bitArgs& a,
                     c10::DeviceIndex device) {
  const LinearBackend backend = linear_backend();
  const bool applies = m >= 1 && blocksize == 64 && (dtype == at::kBFloat16 || dtype == at::kHalf);
  if (!applies || (backend != LinearBackend::Fused && backend != LinearBackend::FusedMma)) return FusedKind::None;
  if (m <= cuda::kFusedMaxM) return FusedKind::SmallM;
  // the large-M kernels index the weight in 32 bits and put M / 128 tiles on grid.y
  const bool large_fits =
      large::fits_32bit_weight_index(a.n, a.k) && (m + large::kTileM - 1) / large::kTileM <= 65535;
  if (!large_fits) return FusedKind::None;
  return backend == LinearBackend::Fused && use_hopper(device) ? FusedKind::LargeMHopper : FusedKind::LargeM;
}

// The inputs of the fused kernels: the weight's buffers (kept alive) and the problem pointing into them.
struct FusedInputs {
  QuantizedTensors weight;
  cuda::Linear4bitProblem problem;
  int num_sms = 0;

  FusedInputs(const at::Tensor& codes, const at::Tensor& absmax, const std::optional<at::Tensor>& scale,
              const std::optional<at::Tensor>& mean, int64_t blocksize, const Linear4bitArgs& a, int64_t m,
              at::ScalarType dtype)
      : weight(codes, absmax, scale, mean, a.double_quant) {
    problem.m = m;
    problem.n = a.n;
    problem.k = a.k;
    problem.blocksize = int(blocksize);
    problem.bf16 = dtype == at::kBFloat16;
    problem.codes = weight.codes.data_ptr<uint8_t>();
    problem.absmax = weight.source;
    problem.codebook = make_codebook(a.quant_type);
    num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  }
};

at::Tensor linear_4bit_cuda(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& absmax,
                            const std::optional<at::Tensor>& absmax_scale,
                            const std::optional<at::Tensor>& absmax_mean, const std::optional<at::Tensor>& bias,
                            int64_t blocksize, const std::string& quant_type, int64_t out_features) {
  const Linear4bitArgs a = check_linear_4bit_args(x, "x", codes, absmax, absmax_scale, absmax_mean, blocksize,
                                                  quant_type, out_features, x.dim() ? x.size(-1) : 0,
                                                  c10::DeviceType::CUDA);
  check_bias(bias, x, a.n);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t m = x.numel() / a.k;
  const FusedKind kind = fused_kind(m, x.scalar_type(), blocksize, a, x.get_device());
  if (kind != FusedKind::None) {
    const FusedInputs f(codes, absmax, absmax_scale, absmax_mean, blocksize, a, m, x.scalar_type());
    const at::Tensor x2 = aligned_contiguous(x.reshape({-1, a.k}));
    const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
    at::Tensor y = at::empty({m, a.n}, x2.options());
    if (kind == FusedKind::LargeM || kind == FusedKind::LargeMHopper) {
      const void* bias_ptr = b.defined() ? b.data_ptr() : nullptr;
      const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
      C10_CUDA_CHECK(kind == FusedKind::LargeM
                         ? cuda::fused_large_linear_forward(f.problem, x2.data_ptr(), bias_ptr, y.data_ptr(), stream)
                         : cuda::hopper_linear_forward(f.problem, x2.data_ptr(), bias_ptr, y.data_ptr(),
                                                       hopper_tile_n(), stream));
      return y.view(with_last_dim(x, a.n));
    }
    at::Tensor ws = at::empty({cuda::fused_forward_workspace_bytes(f.problem, f.num_sms) / 4},
                              x2.options().dtype(at::kFloat));
    C10_CUDA_CHECK(cuda::fused_linear_forward(f.problem, x2.data_ptr(), b.defined() ? b.data_ptr() : nullptr,
                                              y.data_ptr(), ws.data_ptr<float>(), f.num_sms,
                                              at::cuda::getCurrentCUDAStream()));
    return y.view(with_last_dim(x, a.n));
  }
  const at::Tensor x2 = x.reshape({-1, a.k});
  const at::Tensor w = dequantize_weight(codes, absmax, absmax_scale, absmax_mean, blocksize, a, x.scalar_type());
  const at::Tensor y = bias.has_value() ? at::addmm(*bias, x2, w.t()) : at::mm(x2, w.t());
  return y.view(with_last_dim(x, a.n));
}

at::Tensor linear_4bit_grad_input_cuda(const at::Tensor& grad_out, const at::Tensor& codes, const at::Tensor& absmax,
                                       const std::optional<at::Tensor>& absmax_scale,
                                       const std::optional<at::Tensor>& absmax_mean, int64_t blocksize,
                                       const std::string& quant_type, int64_t in_features) {
  const Linear4bitArgs a = check_linear_4bit_args(grad_out, "grad_out", codes, absmax, absmax_scale, absmax_mean,
                                                  blocksize, quant_type, grad_out.dim() ? grad_out.size(-1) : 0,
                                                  in_features, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const int64_t m = grad_out.numel() / a.n;
  const FusedKind kind = fused_kind(m, grad_out.scalar_type(), blocksize, a, grad_out.get_device());
  if (kind != FusedKind::None) {
    const FusedInputs f(codes, absmax, absmax_scale, absmax_mean, blocksize, a, m, grad_out.scalar_type());
    const at::Tensor dy2 = grad_out.reshape({-1, a.n}).contiguous();
    at::Tensor dx = at::empty({m, a.k}, dy2.options());
    if (kind == FusedKind::LargeM || kind == FusedKind::LargeMHopper) {
      const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
      C10_CUDA_CHECK(kind == FusedKind::LargeM
                         ? cuda::fused_large_linear_grad_input(f.problem, dy2.data_ptr(), dx.data_ptr(), stream)
                         : cuda::hopper_linear_grad_input(f.problem, dy2.data_ptr(), dx.data_ptr(), hopper_tile_n(),
                                                          stream));
      return dx.view(with_last_dim(grad_out, a.k));
    }
    at::Tensor ws = at::empty({cuda::fused_grad_input_workspace_bytes(f.problem, f.num_sms) / 4},
                              dy2.options().dtype(at::kFloat));
    C10_CUDA_CHECK(cuda::fused_linear_grad_input(f.problem, dy2.data_ptr(), dx.data_ptr(), ws.data_ptr<float>(),
                                                 f.num_sms, at::cuda::getCurrentCUDAStream()));
    return dx.view(with_last_dim(grad_out, a.k));
  }
  const at::Tensor dy = grad_out.reshape({-1, a.n});
  const at::Tensor w =
      dequantize_weight(codes, absmax, absmax_scale, absmax_mean, blocksize, a, grad_out.scalar_type());
  return at::mm(dy, w).view(with_last_dim(grad_out, a.k));
}

}  // namespace

std::string fused_large_kernel(int64_t device) {
  TORCH_CHECK_VALUE(device >= 0 && device < at::cuda::device_count(), "device must be a CUDA device index below ",
                    int(at::cuda::device_count()), ", got ", device);
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  return use_hopper(static_cast<c10::DeviceIndex>(device)) ? "wgmma" : "mma.sync";
}

TORCH_LIBRARY_IMPL(qlora_ext, CUDA, m) {
  m.impl("linear_4bit", &linear_4bit_cuda);
  m.impl("linear_4bit_grad_input", &linear_4bit_grad_input_cuda);
}

}  // namespace qlora::ops
