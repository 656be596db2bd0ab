// LoRA on a frozen 4-bit base as one op with an explicit backward op:
//   y = x @ W^T (+ bias) + scaling * dropout(x) @ A^T @ B^T
// Composed of the linear_4bit, linear_4bit_grad_input and dropout ops (called through the dispatcher, so
// CUDA gets their CUDA kernels and the linear backend's routing) and ATen GEMMs, so one implementation
// serves CPU and CUDA. The point is what it does not do: as separate modules the adapter path is five
// autograd nodes (dropout, A, the scaling, B added into y, the base) each saving its own inputs; here the
// forward saves the dropped input and the [M, r] product, the backward is one node whose input gradient
// adds the adapter's part into the base's in place, and the dropout mask is regenerated from its seed.
// The forward's numbers are those of the separate ops, in the same order; the gradients equal theirs up
// to GEMM rounding (tests/test_lora_linear.py). The autograd is registered here too, in C++.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <string>

namespace qlora::ops {
namespace {

using OptTensor = std::optional<at::Tensor>;

at::Tensor linear_4bit(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& absmax,
                       const OptTensor& absmax_scale, const OptTensor& absmax_mean, const OptTensor& bias,
                       int64_t blocksize, const std::string& quant_type, int64_t out_features) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("qlora_ext::linear_4bit", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const OptTensor&, const OptTensor&, const OptTensor&, int64_t,
                                               const std::string&, int64_t)>();
  return op.call(x, codes, absmax, absmax_scale, absmax_mean, bias, blocksize, quant_type, out_features);
}

at::Tensor linear_4bit_grad_input(const at::Tensor& grad_out, const at::Tensor& codes, const at::Tensor& absmax,
                                  const OptTensor& absmax_scale, const OptTensor& absmax_mean, int64_t blocksize,
                                  const std::string& quant_type, int64_t in_features) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("qlora_ext::linear_4bit_grad_input", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const OptTensor&, const OptTensor&, int64_t, const std::string&,
                                               int64_t)>();
  return op.call(grad_out, codes, absmax, absmax_scale, absmax_mean, blocksize, quant_type, in_features);
}

at::Tensor dropout(const at::Tensor& x, const at::Tensor& seed, double p) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("qlora_ext::dropout", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double)>();
  return op.call(x, seed, p);
}

bool is_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_adapters(const at::Tensor& x, const at::Tensor& lora_A, const at::Tensor& lora_B, int64_t out_features,
                    double dropout_p) {
  TORCH_CHECK_VALUE(x.dim() >= 1, "x must have at least one dimension, got a scalar");
  const int64_t k = x.size(-1);
  TORCH_CHECK_VALUE(lora_A.dim() == 2 && lora_A.size(0) > 0 && lora_A.size(1) == k,
                    "lora_A must be [r, in_features] = [r, ", k, "] with r > 0, got shape ", lora_A.sizes());
  TORCH_CHECK_VALUE(lora_B.dim() == 2 && lora_B.size(0) == out_features && lora_B.size(1) == lora_A.size(0),
                    "lora_B must be [out_features, r] = [", out_features, ", ", lora_A.size(0), "], got shape ",
                    lora_B.sizes());
  TORCH_CHECK_TYPE(is_float(lora_A.scalar_type()), "lora_A must be a floating-point tensor, got ",
                   lora_A.scalar_type());
  TORCH_CHECK_TYPE(lora_B.scalar_type() == lora_A.scalar_type(), "lora_B must have lora_A's dtype ",
                   lora_A.scalar_type(), ", got ", lora_B.scalar_type());
  TORCH_CHECK(lora_A.device() == x.device() && lora_B.device() == x.device(),
              "lora_A and lora_B must be on x's device ", x.device(), ", got ", lora_A.device(), " and ",
              lora_B.device());
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ", dropout_p);
}

// Whether the forward returns the adapter's input as its own tensor: with dropout, or when it is x cast to
// the adapters' dtype. Otherwise it is x itself, which an op may not return (outputs must not alias
// inputs); the backward then gets x instead.
bool owns_lora_input(const at::Tensor& x, const at::Tensor& lora_A, double dropout_p) {
  return dropout_p > 0.0 || x.scalar_type() != lora_A.scalar_type();
}

// Returns (y [..., N] in x's dtype, the adapter's input dropout(x) [M, K] in the adapters' dtype (or an
// empty tensor, see owns_lora_input), the scaled product scaling * (that input @ A^T) [M, r]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_linear_4bit(
    const at::Tensor& x, const at::Tensor& codes, const at::Tensor& absmax, const OptTensor& absmax_scale,
    const OptTensor& absmax_mean, const OptTensor& bias, const at::Tensor& lora_A, const at::Tensor& lora_B,
    const at::Tensor& seed, int64_t blocksize, const std::string& quant_type, int64_t out_features, double scaling,
    double dropout_p) {
  check_adapters(x, lora_A, lora_B, out_features, dropout_p);
  const int64_t k = x.size(-1);
  const at::Tensor x2 = x.reshape({-1, k});
  at::Tensor y = linear_4bit(x2, codes, absmax, absmax_scale, absmax_mean, bias, blocksize, quant_type,
                             out_features);
  at::Tensor lora_input = dropout_p > 0.0 ? dropout(x2, seed, dropout_p) : x2;
  if (lora_input.scalar_type() != lora_A.scalar_type()) lora_input = lora_input.to(lora_A.scalar_type());
  // alpha/r scales the [M, r] product, not the [M, N] one (r/N as many multiplies)
  at::Tensor lora_hidden = at::mm(lora_input, lora_A.t()).mul_(scaling);
  if (y.scalar_type() == lora_hidden.scalar_type()) {
    y.addmm_(lora_hidden, lora_B.t());  // B's product added inside the GEMM: no separate pass over y
  } else {
    y.add_(at::mm(lora_hidden, lora_B.t()).to(y.scalar_type()));
  }
  std::vector<int64_t> y_shape(x.sizes().begin(), x.sizes().end());
  y_shape.back() = out_features;
  if (!owns_lora_input(x, lora_A, dropout_p)) lora_input = at::empty({0}, x.options());
  return {y.view(y_shape), lora_input, lora_hidden};
}

// The gradients of lora_linear_4bit with respect to x (if grad_x; else an empty tensor), lora_A and lora_B.
// lora_input is the forward's second output, or x when the forward did not own it.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_linear_4bit_backward(
    const at::Tensor& grad_y, const at::Tensor& lora_input, const at::Tensor& lora_hidden, const at::Tensor& codes,
    const at::Tensor& absmax, const OptTensor& absmax_scale, const OptTensor& absmax_mean, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& seed, int64_t blocksize, const std::string& quant_type,
    int64_t in_features, double scaling, double dropout_p, bool grad_x) {
  TORCH_CHECK_VALUE(grad_y.dim() >= 1, "grad_y must have at least one dimension, got a scalar");
  const int64_t n = grad_y.size(-1);
  // reshaped once: when the forward did not own the adapter's input this is x, and a non-contiguous x
  // would be copied by every reshape
  const at::Tensor input = lora_input.reshape({-1, in_features});
  check_adapters(input, lora_A, lora_B, n, dropout_p);
  const at::Tensor dy = grad_y.reshape({-1, n});
  TORCH_CHECK_VALUE(input.size(0) == dy.size(0) && lora_hidden.dim() == 2 && lora_hidden.size(0) == dy.size(0) &&
                        lora_hidden.size(1) == lora_A.size(0),
                    "lora_input [M, in_features] and lora_hidden [M, r] must match grad_y's M = ", dy.size(0));
  const at::Tensor dy_adapter = dy.scalar_type() == lora_B.scalar_type() ? dy : dy.to(lora_B.scalar_type());
  at::Tensor grad_B = at::mm(dy_adapter.t(), lora_hidden);               // [N, r]
  const at::Tensor d_hidden = at::mm(dy_adapter, lora_B).mul_(scaling);  // [M, r], scaled like the forward
  at::Tensor grad_A = at::mm(d_hidden.t(), input);                       // [r, K]
  if (!grad_x) return {at::empty({0}, grad_y.options()), grad_A, grad_B};
  at::Tensor dx = linear_4bit_grad_input(dy, codes, absmax, absmax_scale, absmax_mean, blocksize, quant_type,
                                         in_features);
  if (dropout_p == 0.0 && dx.scalar_type() == d_hidden.scalar_type()) {
    dx.addmm_(d_hidden, lora_A);
  } else {
    // the forward dropped x, then cast it: the backward casts, then applies the same mask and scale
    at::Tensor lora_dx = at::mm(d_hidden, lora_A);
    if (lora_dx.scalar_type() != dx.scalar_type()) lora_dx = lora_dx.to(dx.scalar_type());
    if (dropout_p > 0.0) lora_dx = dropout(lora_dx, seed, dropout_p);
    dx.add_(lora_dx);
  }
  std::vector<int64_t> dx_shape(grad_y.sizes().begin(), grad_y.sizes().end());
  dx_shape.back() = in_features;
  return {dx.view(dx_shape), grad_A, grad_B};
}

// The autograd of lora_linear_4bit, in C++: the torch.library Python wrapper cost ~37 us a call, about
// 1% of a CPU training step over 210 adapted layers. The forward saves what the backward op needs; the
// backward is the lora_linear_4bit_backward op (which torch.compile traces like any other op).
class LoraLinear4bitFunction : public torch::autograd::Function<LoraLinear4bitFunction> {
 public:
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& codes, const at::Tensor& absmax,
      const OptTensor& absmax_scale, const OptTensor& absmax_mean, const OptTensor& bias, const at::Tensor& lora_A,
      const at::Tensor& lora_B, const at::Tensor& seed, int64_t blocksize, const std::string& quant_type,
      int64_t out_features, double scaling, double dropout_p) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("qlora_ext::lora_linear_4bit", "")
                               .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                                   const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                                   const OptTensor&, const OptTensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, int64_t, const std::string&, int64_t, double, double)>();
    auto [y, lora_input, lora_hidden] = op.call(x, codes, absmax, absmax_scale, absmax_mean, bias, lora_A, lora_B,
                                                seed, blocksize, quant_type, out_features, scaling, dropout_p);
    ctx->mark_non_differentiable({lora_input, lora_hidden});
    const bool owns = owns_lora_input(x, lora_A, dropout_p);
    ctx->save_for_backward({owns ? lora_input : x, lora_hidden, codes, absmax, absmax_scale.value_or(at::Tensor()),
                            absmax_mean.value_or(at::Tensor()), lora_A, lora_B, seed});
    ctx->saved_data["blocksize"] = blocksize;
    ctx->saved_data["quant_type"] = quant_type;
    ctx->saved_data["in_features"] = x.size(-1);
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["dropout_p"] = dropout_p;
    // which inputs want a gradient (needs_input_grad counts only the defined tensor inputs, so its indices
    // move with the optional ones: ask the inputs themselves)
    ctx->saved_data["x_grad"] = x.requires_grad();
    ctx->saved_data["bias_grad"] = bias.has_value() && bias->requires_grad();
    ctx->saved_data["lora_A_grad"] = lora_A.requires_grad();
    ctx->saved_data["lora_B_grad"] = lora_B.requires_grad();
    return {y, lora_input, lora_hidden};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const auto optional = [](const at::Tensor& t) { return t.defined() ? OptTensor(t) : OptTensor(); };
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("qlora_ext::lora_linear_4bit_backward", "")
                               .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                                   const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, const OptTensor&, const OptTensor&, const at::Tensor&,
                                   const at::Tensor&, const at::Tensor&, int64_t, const std::string&, int64_t,
                                   double, double, bool)>();
    const at::Tensor& grad_y = grad_outputs[0];
    const bool need_x = ctx->saved_data["x_grad"].toBool();
    auto [grad_x, grad_A, grad_B] =
        op.call(grad_y, saved[0], saved[1], saved[2], saved[3], optional(saved[4]), optional(saved[5]), saved[6],
                saved[7], saved[8], ctx->saved_data["blocksize"].toInt(), ctx->saved_data["quant_type"].toStringRef(),
                ctx->saved_data["in_features"].toInt(), ctx->saved_data["scaling"].toDouble(),
                ctx->saved_data["dropout_p"].toDouble(), need_x);
    at::Tensor grad_bias;
    if (ctx->saved_data["bias_grad"].toBool()) grad_bias = grad_y.reshape({-1, grad_y.size(-1)}).sum(0);
    // one entry per forward argument; the quantized weight, the seed and the scalars get none
    return {need_x ? grad_x : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), grad_bias,
            ctx->saved_data["lora_A_grad"].toBool() ? grad_A : at::Tensor(),
            ctx->saved_data["lora_B_grad"].toBool() ? grad_B : at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_linear_4bit_autograd(
    const at::Tensor& x, const at::Tensor& codes, const at::Tensor& absmax, const OptTensor& absmax_scale,
    const OptTensor& absmax_mean, const OptTensor& bias, const at::Tensor& lora_A, const at::Tensor& lora_B,
    const at::Tensor& seed, int64_t blocksize, const std::string& quant_type, int64_t out_features, double scaling,
    double dropout_p) {
  auto out = LoraLinear4bitFunction::apply(x, codes, absmax, absmax_scale, absmax_mean, bias, lora_A, lora_B, seed,
                                           blocksize, quant_type, out_features, scaling, dropout_p);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qlora_ext, m) {
  // y = x @ W^T (+ bias) + scaling * dropout(x) @ lora_A^T @ lora_B^T, W [N, K] stored 4-bit as for
  // linear_4bit, lora_A [r, K] and lora_B [N, r] in one floating dtype (the adapter's arithmetic runs in it;
  // y has x's dtype), dropout with the dropout op's mask for seed (an int64 tensor as the dropout op
  // takes it; unused when dropout_p = 0). Returns (y, the adapter's input or an empty tensor, scaling * input @ lora_A^T): the
  // two extra outputs are what lora_linear_4bit_backward needs.
  m.def(
      "lora_linear_4bit(Tensor x, Tensor codes, Tensor absmax, Tensor? absmax_scale, Tensor? absmax_mean, "
      "Tensor? bias, Tensor lora_A, Tensor lora_B, Tensor seed, int blocksize, str quant_type, int out_features, "
      "float scaling, float dropout_p) -> (Tensor, Tensor, Tensor)");
  m.def(
      "lora_linear_4bit_backward(Tensor grad_y, Tensor lora_input, Tensor lora_hidden, Tensor codes, "
      "Tensor absmax, Tensor? absmax_scale, Tensor? absmax_mean, Tensor lora_A, Tensor lora_B, Tensor seed, "
      "int blocksize, str quant_type, int in_features, float scaling, float dropout_p, bool grad_x) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(qlora_ext, CPU, m) {
  m.impl("lora_linear_4bit", &lora_linear_4bit);
  m.impl("lora_linear_4bit_backward", &lora_linear_4bit_backward);
}
TORCH_LIBRARY_IMPL(qlora_ext, CUDA, m) {
  m.impl("lora_linear_4bit", &lora_linear_4bit);
  m.impl("lora_linear_4bit_backward", &lora_linear_4bit_backward);
}
TORCH_LIBRARY_IMPL(qlora_ext, Autograd, m) { m.impl("lora_linear_4bit", &lora_linear_4bit_autograd); }

}  // namespace qlora::ops
