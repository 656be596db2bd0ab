// CUDA implementation of linear_4bit and its input gradient, with the dispatcher between
// - the fused kernels (bf16/fp16, blocksize 64): small M (csrc/kernels/linear_4bit_cuda.cu, M <= 64) and
//   large M (M > 64: csrc/kernels/linear_4bit_hopper_cuda.cu with wgmma on Hopper when the build has sm_90a,
//   else csrc/kernels/linear_4bit_large_cuda.cu with mma.sync), and
// - dequantize + cuBLAS (as bitsandbytes does for training: the dense W exists transiently in x's dtype).
// "auto" follows the routing table (linear_auto_routing.h: per GPU, direction and range of M, the backend
// bench/bench_linear_cuda.py measured fastest), dequantize + cuBLAS where it has no rule;
// set_linear_backend("fused") forces the fused kernels, and "tune" measures every candidate once per class of
// problem and keeps the fastest (linear_autotune_cuda.h).
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "../kernels/linear_4bit_cuda.h"
#include "../kernels/linear_4bit_large_layout.h"
#include "../kernels/linear_4bit_split.h"
#include "../kernels/quantize_cuda.h"
#include "linear_auto_routing.h"
#include "linear_autotune_cuda.h"
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

static_assert(int(split::SplitMode::Cta) == 1 && int(split::SplitMode::Grid) == 2,
              "set_fused_split's numbering (linear_backend.cpp) is split::SplitMode's");

// One way to compute a call: dequantize + cuBLAS, or one of the fused kernels (tile_n: the Hopper kernels' tile
// width, 0 = theirs to choose; small_split: the small-M kernels' split mode, -1 = set_fused_split's).
struct Plan {
  enum Kind { Dequant, SmallM, LargeM, Hopper } kind = Dequant;
  int tile_n = 0;
  int small_split = -1;
  std::string name() const {
    switch (kind) {
      case SmallM: return small_split == int(split::SplitMode::Grid) ? "fused small-M grid split"
                                                                            : "fused small-M";
      case LargeM: return "fused mma.sync";
      case Hopper: return "fused wgmma TN=" + (tile_n ? std::to_string(tile_n) : std::string("auto"));
      default: return "dequant+cuBLAS";
    }
  }
};

// The fused kernels that can serve (m, dtype, blocksize) on `device`: none, the small-M ones (as set, then with
// the grid split when that is not already the setting), or the large-M ones (wgmma in both tile widths when
// available, then mma.sync).
std::vector<Plan> fused_plans(int64_t m, at::ScalarType dtype, int64_t blocksize, const Linear4bitArgs& a,
                              c10::DeviceIndex device) {
  const bool applies = m >= 1 && blocksize == 64 && (dtype == at::kBFloat16 || dtype == at::kHalf);
  if (!applies) return {};
  if (m <= cuda::kFusedMaxM) {
    if (fused_split() == int(split::SplitMode::Grid)) return {Plan{Plan::SmallM}};
    return {Plan{Plan::SmallM}, Plan{Plan::SmallM, 0, int(split::SplitMode::Grid)}};
  }
  // the large-M kernels index the weight in 32 bits and put M / 128 tiles on grid.y
  if (!large::fits_32bit_weight_index(a.n, a.k) || (m + large::kTileM - 1) / large::kTileM > 65535) return {};
  std::vector<Plan> plans;
  if (use_hopper(device)) plans = {Plan{Plan::Hopper, 128}, Plan{Plan::Hopper, 256}};
  plans.push_back(Plan{Plan::LargeM});
  return plans;
}

// Where "auto" routes M rows in a direction on the current GPU (Dequant for the other backends, which do not
// follow the table).
RoutedBackend route_of(bool grad, int64_t m) {
  if (linear_backend() != LinearBackend::Auto) return RoutedBackend::Dequant;
  const cudaDeviceProp* p = at::cuda::getCurrentDeviceProperties();
  return auto_route(p->major * 10 + p->minor, grad, m);
}

// Whether this call may run a fused kernel ("dequant", and "auto" where it routes to dequantize + cuBLAS, never
// ask, so they never probe the GPU).
bool uses_fused_kernels(RoutedBackend route) {
  const LinearBackend b = linear_backend();
  return b == LinearBackend::Fused || b == LinearBackend::FusedMma || b == LinearBackend::Tune ||
         route != RoutedBackend::Dequant;
}

// The plan of a routed backend, as bench/bench_linear_cuda.py measured it: "fused" the first fused candidate
// with the kernels' own tile width, "fused_tn128" the Hopper kernels' 128-column tile, "fused_grid" the small-M
// kernels' grid-only split, "fused_mma" the mma.sync large-M kernels; a variant that does not apply (no Hopper
// kernels, M > 64) is "fused". The split is the kernels' own ("auto") whatever set_fused_split says, which is
// a test hook. Dequantize + cuBLAS where no fused kernel applies (fp32, another blocksize).
Plan routed_plan(RoutedBackend route, const std::vector<Plan>& fused) {
  if (route == RoutedBackend::Dequant || fused.empty()) return Plan{};
  const int own_split = int(split::SplitMode::Auto);
  switch (fused.front().kind) {
    case Plan::SmallM:
      return Plan{Plan::SmallM, 0, route == RoutedBackend::FusedGrid ? int(split::SplitMode::Grid) : own_split};
    case Plan::Hopper:
      if (route == RoutedBackend::FusedMma) return Plan{Plan::LargeM, 0, own_split};
      return Plan{Plan::Hopper, route == RoutedBackend::FusedTn128 ? 128 : 0, own_split};
    default:
      return Plan{Plan::LargeM, 0, own_split};
  }
}

// The plan of the backends other than "tune": "auto" the routed one; "fused" the first fused candidate (wgmma
// on Hopper, in the tile width set_hopper_tile_n asks for; the small-M kernels split as set_fused_split says),
// "fused_mma" the same small-M kernels and the mma.sync ones for large M; "dequant" dequantize + cuBLAS.
Plan fixed_plan(const std::vector<Plan>& fused, RoutedBackend route) {
  switch (linear_backend()) {
    case LinearBackend::Auto:
      return routed_plan(route, fused);
    case LinearBackend::Fused:
      if (fused.empty()) return Plan{};
      return fused.front().kind == Plan::Hopper ? Plan{Plan::Hopper, hopper_tile_n()} : fused.front();
    case LinearBackend::FusedMma:  // the small-M kernels as "fused" does; the mma.sync ones above
      if (fused.empty()) return Plan{};
      return fused.front().kind == Plan::SmallM ? fused.front() : fused.back();
    default:
      return Plan{};
  }
}

// "tune": the fastest of dequantize + cuBLAS and the fused candidates for this class of problem (M rounded up
// to a power of two), measured the first time the class is seen; dequantize + cuBLAS during graph capture.
Plan tuned(const char* direction, int64_t m, at::ScalarType dtype, const Linear4bitArgs& a, bool has_bias,
           std::vector<Plan> candidates, const std::function<at::Tensor(const Plan&)>& run) {
  candidates.insert(candidates.begin(), Plan{});
  if (candidates.size() == 1) return candidates[0];
  int64_t m_class = 1;
  while (m_class < m) m_class *= 2;
  const std::string key = std::string(direction) + " " + c10::toString(dtype) + " N=" + std::to_string(a.n) +
                          " K=" + std::to_string(a.k) + " M<=" + std::to_string(m_class) +
                          (a.double_quant ? " fp8-absmax" : " fp32-absmax") + (has_bias ? " bias" : "") +
                          " cuda:" + std::to_string(int(c10::cuda::current_device())) + " split=" +
                          fused_split_name() + " of " +
                          std::to_string(candidates.size());  // the set grows once the Hopper probe has answered
  const int i = tuned_choice(
      key, int(candidates.size()), [&](int j) { return run(candidates[size_t(j)]); },
      [&](int j) { return candidates[size_t(j)].name(); });
  return i < 0 ? Plan{} : candidates[size_t(i)];
}

// The inputs of the fused kernels: the weight's buffers (kept alive) and the problem pointing into them.
struct FusedInputs {
  QuantizedTensors weight;
  cuda::Linear4bitProblem problem;
  int num_sms = 0;

  FusedInputs(const at::Tensor& codes, const at::Tensor& absmax, const std::optional<at::Tensor>& scale,
              const std::optional<at::Tensor>& mean, int64_t blocksize, const Linear4bitArgs& a, int64_t m,
              at::ScalarType dtype, const Plan& plan)
      : weight(codes, absmax, scale, mean, a.double_quant) {
    problem.m = m;
    problem.n = a.n;
    problem.k = a.k;
    problem.blocksize = int(blocksize);
    problem.bf16 = dtype == at::kBFloat16;
    problem.codes = weight.codes.data_ptr<uint8_t>();
    problem.absmax = weight.source;
    problem.codebook = make_codebook(a.quant_type);
    problem.split_mode = plan.small_split >= 0 ? plan.small_split : fused_split();
    num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  }
};

// The fp32 split partial sums the plan's kernel writes where it splits its reduction over the grid (empty
// where it does not), on the activations' device.
at::Tensor split_workspace(const Plan& plan, const FusedInputs& f, bool grad, const at::TensorOptions& options) {
  const int64_t bytes =
      plan.kind == Plan::LargeM   ? cuda::fused_large_workspace_bytes(f.problem, grad, f.num_sms)
      : plan.kind == Plan::Hopper ? cuda::hopper_workspace_bytes(f.problem, grad, plan.tile_n, f.num_sms)
      : grad                      ? cuda::fused_grad_input_workspace_bytes(f.problem, f.num_sms)
                                  : cuda::fused_forward_workspace_bytes(f.problem, f.num_sms);
  return at::empty({bytes / int64_t(sizeof(float))}, options.dtype(at::kFloat));
}

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
  const RoutedBackend route = route_of(false, m);
  const std::vector<Plan> fused = uses_fused_kernels(route)
                                      ? fused_plans(m, x.scalar_type(), blocksize, a, x.get_device())
                                      : std::vector<Plan>{};

  auto run = [&](const Plan& plan) -> at::Tensor {
    if (plan.kind == Plan::Dequant) {
      const at::Tensor x2 = x.reshape({-1, a.k});
      const at::Tensor w = dequantize_weight(codes, absmax, absmax_scale, absmax_mean, blocksize, a, x.scalar_type());
      return bias.has_value() ? at::addmm(*bias, x2, w.t()) : at::mm(x2, w.t());
    }
    const FusedInputs f(codes, absmax, absmax_scale, absmax_mean, blocksize, a, m, x.scalar_type(), plan);
    const at::Tensor x2 = aligned_contiguous(x.reshape({-1, a.k}));
    const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
    const void* bias_ptr = b.defined() ? b.data_ptr() : nullptr;
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    at::Tensor y = at::empty({m, a.n}, x2.options());
    const at::Tensor ws = split_workspace(plan, f, false, x2.options());
    float* wsp = ws.numel() ? ws.data_ptr<float>() : nullptr;
    if (plan.kind == Plan::LargeM) {
      C10_CUDA_CHECK(cuda::fused_large_linear_forward(f.problem, x2.data_ptr(), bias_ptr, y.data_ptr(), wsp,
                                                      f.num_sms, stream));
    } else if (plan.kind == Plan::Hopper) {
      C10_CUDA_CHECK(cuda::hopper_linear_forward(f.problem, x2.data_ptr(), bias_ptr, y.data_ptr(), plan.tile_n, wsp,
                                                 f.num_sms, stream));
    } else {
      C10_CUDA_CHECK(cuda::fused_linear_forward(f.problem, x2.data_ptr(), bias_ptr, y.data_ptr(), wsp, f.num_sms,
                                                stream));
    }
    return y;
  };
  const auto tuned_run = [&](const Plan& p) { return run(p); };
  const Plan plan = linear_backend() == LinearBackend::Tune
                        ? tuned("fwd", m, x.scalar_type(), a, bias.has_value(), fused, tuned_run)
                        : fixed_plan(fused, route);
  return run(plan).view(with_last_dim(x, a.n));
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
  const RoutedBackend route = route_of(true, m);
  const std::vector<Plan> fused = uses_fused_kernels(route)
                                      ? fused_plans(m, grad_out.scalar_type(), blocksize, a, grad_out.get_device())
                                      : std::vector<Plan>{};

  auto run = [&](const Plan& plan) -> at::Tensor {
    if (plan.kind == Plan::Dequant) {
      const at::Tensor w =
          dequantize_weight(codes, absmax, absmax_scale, absmax_mean, blocksize, a, grad_out.scalar_type());
      return at::mm(grad_out.reshape({-1, a.n}), w);
    }
    const FusedInputs f(codes, absmax, absmax_scale, absmax_mean, blocksize, a, m, grad_out.scalar_type(), plan);
    const at::Tensor dy2 = grad_out.reshape({-1, a.n}).contiguous();
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    at::Tensor dx = at::empty({m, a.k}, dy2.options());
    const at::Tensor ws = split_workspace(plan, f, true, dy2.options());
    float* wsp = ws.numel() ? ws.data_ptr<float>() : nullptr;
    if (plan.kind == Plan::LargeM) {
      C10_CUDA_CHECK(
          cuda::fused_large_linear_grad_input(f.problem, dy2.data_ptr(), dx.data_ptr(), wsp, f.num_sms, stream));
    } else if (plan.kind == Plan::Hopper) {
      C10_CUDA_CHECK(cuda::hopper_linear_grad_input(f.problem, dy2.data_ptr(), dx.data_ptr(), plan.tile_n, wsp,
                                                    f.num_sms, stream));
    } else {
      C10_CUDA_CHECK(
          cuda::fused_linear_grad_input(f.problem, dy2.data_ptr(), dx.data_ptr(), wsp, f.num_sms, stream));
    }
    return dx;
  };
  const auto tuned_run = [&](const Plan& p) { return run(p); };
  const Plan plan = linear_backend() == LinearBackend::Tune
                        ? tuned("bwd", m, grad_out.scalar_type(), a, false, fused, tuned_run)
                        : fixed_plan(fused, route);
  return run(plan).view(with_last_dim(grad_out, a.k));
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
