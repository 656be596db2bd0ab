"""Thin Python layer over the native ops in torch.ops.qlora_ext: loads the extension and registers the
fake (meta) implementations that torch.compile and opcheck use to infer output shapes and dtypes, and the
autograd of the ops whose backward is written in Python."""
import math

import torch

from . import _C  # noqa: F401  (loading the library registers the ops)

ops = torch.ops.qlora_ext

BLOCKSIZES = (64, 128, 256)
QUANT_TYPES = ("nf4", "fp4", "int4")
ABSMAX_CHUNK = 256  # double quantization: one fp32 scale per 256 first-level absmax
ADAMW8BIT_BLOCK = _C.ADAMW8BIT_BLOCK  # 8-bit optimizer states: one fp32 absmax per 256 elements


def _num_blocks(numel, blocksize):
    return (numel + blocksize - 1) // blocksize


@torch.library.register_fake("qlora_ext::quantize_4bit")
def _quantize_4bit_fake(x, blocksize, quant_type):
    torch._check(x.dtype in (torch.float32, torch.float16, torch.bfloat16),
                 lambda: f"x must be float32, float16 or bfloat16, got {x.dtype}")
    torch._check(blocksize in BLOCKSIZES, lambda: f"blocksize must be 64, 128 or 256, got {blocksize}")
    numel = x.numel()
    codes = x.new_empty(((numel + 1) // 2,), dtype=torch.uint8)
    absmax = x.new_empty((_num_blocks(numel, blocksize),), dtype=torch.float32)
    nonfinite = x.new_empty((1,), dtype=torch.int32)
    return codes, absmax, nonfinite


@torch.library.register_fake("qlora_ext::quantize_absmax_fp8")
def _quantize_absmax_fp8_fake(absmax):
    torch._check(absmax.dtype == torch.float32, lambda: f"absmax must be float32, got {absmax.dtype}")
    n = absmax.numel()
    return (absmax.new_empty((n,), dtype=torch.uint8),
            absmax.new_empty((_num_blocks(n, ABSMAX_CHUNK),)),
            absmax.new_empty((1,)))


@torch.library.register_fake("qlora_ext::dequantize_absmax_fp8")
def _dequantize_absmax_fp8_fake(codes, scale, mean):
    torch._check(codes.dtype == torch.uint8, lambda: f"codes must be uint8 (FP8 E4M3 bits), got {codes.dtype}")
    return codes.new_empty(codes.shape, dtype=torch.float32)


@torch.library.register_fake("qlora_ext::dequantize_4bit")
def _dequantize_4bit_fake(codes, absmax, absmax_scale, absmax_mean, blocksize, quant_type, shape, dtype):
    torch._check(codes.dtype == torch.uint8, lambda: f"codes must be uint8, got {codes.dtype}")
    torch._check(dtype in (torch.float32, torch.float16, torch.bfloat16),
                 lambda: f"dtype must be float32, float16 or bfloat16, got {dtype}")
    return codes.new_empty(shape, dtype=dtype)


@torch.library.register_fake("qlora_ext::linear_4bit")
def _linear_4bit_fake(x, codes, absmax, absmax_scale, absmax_mean, bias, blocksize, quant_type, out_features):
    torch._check(x.dim() >= 1, lambda: "x must have at least one dimension")
    torch._check(x.shape[-1] % blocksize == 0,
                 lambda: f"in_features (K = {x.shape[-1]}) must be a multiple of blocksize ({blocksize})")
    torch._check(codes.numel() * 2 == out_features * x.shape[-1],
                 lambda: "x's last dimension or out_features does not match the quantized weight")
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.register_fake("qlora_ext::linear_4bit_grad_input")
def _linear_4bit_grad_input_fake(grad_out, codes, absmax, absmax_scale, absmax_mean, blocksize, quant_type,
                                 in_features):
    torch._check(codes.numel() * 2 == grad_out.shape[-1] * in_features,
                 lambda: "grad_out's last dimension or in_features does not match the quantized weight")
    return grad_out.new_empty((*grad_out.shape[:-1], in_features))


def _linear_4bit_setup_context(ctx, inputs, output):
    x, codes, absmax, absmax_scale, absmax_mean, bias, blocksize, quant_type, out_features = inputs
    ctx.save_for_backward(codes, absmax, absmax_scale, absmax_mean)
    ctx.blocksize, ctx.quant_type, ctx.in_features = blocksize, quant_type, x.shape[-1]
    ctx.has_bias = bias is not None


def _linear_4bit_backward(ctx, grad_out):
    codes, absmax, absmax_scale, absmax_mean = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = ops.linear_4bit_grad_input(grad_out, codes, absmax, absmax_scale, absmax_mean, ctx.blocksize,
                                            ctx.quant_type, ctx.in_features)
    if ctx.has_bias and ctx.needs_input_grad[5]:
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
    # The quantized weight is frozen: no gradient for codes and constants.
    return grad_x, None, None, None, None, grad_bias, None, None, None


torch.library.register_autograd("qlora_ext::linear_4bit", _linear_4bit_backward,
                                setup_context=_linear_4bit_setup_context)


@torch.library.register_fake("qlora_ext::dropout")
def _dropout_fake(x, seed, p):
    torch._check(seed.numel() == 1, lambda: f"seed must have one element, got {seed.numel()}")
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _dropout_setup_context(ctx, inputs, output):
    x, seed, p = inputs
    ctx.save_for_backward(seed)
    ctx.p = p


def _dropout_backward(ctx, grad_out):
    # The mask is a function of (seed, index): the same call on the gradient applies the same mask and scale.
    (seed,) = ctx.saved_tensors
    return ops.dropout(grad_out, seed, ctx.p), None, None


torch.library.register_autograd("qlora_ext::dropout", _dropout_backward, setup_context=_dropout_setup_context)


@torch.library.register_fake("qlora_ext::adamw_step_")
def _adamw_step_fake(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay, maximize):
    torch._check(len(grads) == len(params) and len(exp_avgs) == len(params) and len(exp_avg_sqs) == len(params)
                 and len(steps) == len(params),
                 lambda: "params, grads, exp_avgs, exp_avg_sqs and steps must have the same length")
    for p, m, v in zip(params, exp_avgs, exp_avg_sqs):
        torch._check(m.dtype == torch.float32 and v.dtype == torch.float32,
                     lambda: "exp_avgs and exp_avg_sqs must be float32")
        torch._check(m.shape == p.shape and v.shape == p.shape, lambda: "states must have their params' shapes")
    return None


@torch.library.register_fake("qlora_ext::adamw8bit_step_")
def _adamw8bit_step_fake(params, grads, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax, steps,
                         lr, beta1, beta2, eps, weight_decay, maximize):
    lists = (grads, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax, steps)
    torch._check(all(len(x) == len(params) for x in lists),
                 lambda: "params, grads, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax and "
                         "steps must have the same length")
    for p, c1, a1, c2, a2 in zip(params, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax):
        torch._check(c1.dtype == torch.uint8 and c2.dtype == torch.uint8, lambda: "state codes must be uint8")
        torch._check(c1.shape == p.shape and c2.shape == p.shape, lambda: "state codes must have their params' shapes")
        torch._check(a1.dtype == torch.float32 and a2.dtype == torch.float32, lambda: "absmax must be float32")
        torch._check(a1.numel() == _num_blocks(p.numel(), ADAMW8BIT_BLOCK)
                     and a2.numel() == _num_blocks(p.numel(), ADAMW8BIT_BLOCK),
                     lambda: "absmax must have one element per block of 256 parameter elements")
    return None


@torch.library.register_fake("qlora_ext::quantize_8bit_dynamic")
def _quantize_8bit_dynamic_fake(x, is_signed):
    torch._check(x.dtype == torch.float32, lambda: f"x must be float32, got {x.dtype}")
    return (x.new_empty(x.shape, dtype=torch.uint8),
            x.new_empty((_num_blocks(x.numel(), ADAMW8BIT_BLOCK),), dtype=torch.float32))


@torch.library.register_fake("qlora_ext::dequantize_8bit_dynamic")
def _dequantize_8bit_dynamic_fake(codes, absmax, is_signed):
    torch._check(codes.dtype == torch.uint8, lambda: f"codes must be uint8, got {codes.dtype}")
    torch._check(absmax.dtype == torch.float32, lambda: f"absmax must be float32, got {absmax.dtype}")
    return codes.new_empty(codes.shape, dtype=torch.float32)


@torch.library.register_fake("qlora_ext::linear_cross_entropy")
def _linear_cross_entropy_fake(hidden, weight, bias, labels, ignore_index, compute_grad, chunk_rows=0,
                               compute_head_grad=False):
    torch._check(hidden.dim() == 2 and weight.dim() == 2 and weight.shape[1] == hidden.shape[1],
                 lambda: "hidden must be [tokens, hidden_size] and weight [vocab, hidden_size]")
    torch._check(labels.dim() == 1 and labels.shape[0] == hidden.shape[0], lambda: "labels must be [tokens]")
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    grad_shape = hidden.shape if compute_grad else (0, hidden.shape[1])
    grad_dtype = torch.float32 if hidden.dtype == torch.float16 else hidden.dtype   # (see the op's comment)
    weight_grad_shape = weight.shape if compute_head_grad else (0, hidden.shape[1])
    bias_grad_shape = (weight.shape[0],) if compute_head_grad and bias is not None else (0,)
    return (hidden.new_empty((), dtype=acc), hidden.new_empty(grad_shape, dtype=grad_dtype),
            hidden.new_empty(weight_grad_shape, dtype=acc), hidden.new_empty(bias_grad_shape, dtype=acc))


def _linear_cross_entropy_setup_context(ctx, inputs, output):
    ctx.compute_grad, ctx.compute_head_grad = inputs[5], inputs[7]   # (defaults filled in by torch.library)
    ctx.dtypes = inputs[0].dtype, inputs[1].dtype, None if inputs[2] is None else inputs[2].dtype
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(*output[1:])
    # The gradients are outputs no one differentiates: without this, autograd would hand the backward a zero
    # tensor for each, one of them the size of the head's weight in float32.
    ctx.set_materialize_grads(False)


def _scaled(grad: torch.Tensor, grad_loss: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """grad * grad_loss in dtype. The forward pass computed d(loss)/d(input); this is the chain rule with the
    incoming scalar gradient, applied in float32 (or float64) and rounded once (a bf16 copy of, say, 1/3 from
    gradient accumulation would be 0.2% off)."""
    if grad.dtype in (torch.float32, torch.float64):
        return (grad * grad_loss.to(grad.dtype)).to(dtype)
    return (grad.float() * grad_loss.float()).to(dtype)


def _linear_cross_entropy_backward(ctx, grad_loss, *_grads_of_grads):
    if grad_loss is None:   # (grads are not materialized: no gradient reached the loss)
        return (None,) * 8
    grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
    if (ctx.needs_input_grad[0] and not ctx.compute_grad) or \
            ((ctx.needs_input_grad[1] or ctx.needs_input_grad[2]) and not ctx.compute_head_grad):
        raise RuntimeError("linear_cross_entropy was called with compute_grad=False or compute_head_grad=False: "
                           "it has no gradient to give for that input")
    hidden_dtype, weight_dtype, bias_dtype = ctx.dtypes
    return (_scaled(grad_hidden, grad_loss, hidden_dtype) if ctx.needs_input_grad[0] else None,
            _scaled(grad_weight, grad_loss, weight_dtype) if ctx.needs_input_grad[1] else None,
            _scaled(grad_bias, grad_loss, bias_dtype) if ctx.needs_input_grad[2] else None,
            None, None, None, None, None)


torch.library.register_autograd("qlora_ext::linear_cross_entropy", _linear_cross_entropy_backward,
                                setup_context=_linear_cross_entropy_setup_context)


def _owns_lora_input(x, lora_A, dropout_p):  # as in csrc/torch_bindings/lora_linear_4bit_ops.cpp
    return dropout_p > 0.0 or x.dtype != lora_A.dtype


@torch.library.register_fake("qlora_ext::lora_linear_4bit")
def _lora_linear_4bit_fake(x, codes, absmax, absmax_scale, absmax_mean, bias, lora_A, lora_B, seed, blocksize,
                           quant_type, out_features, scaling, dropout_p):
    torch._check(x.dim() >= 1, lambda: "x must have at least one dimension")
    torch._check(lora_A.dim() == 2 and lora_A.shape[1] == x.shape[-1], lambda: "lora_A must be [r, in_features]")
    torch._check(lora_B.dim() == 2 and lora_B.shape[0] == out_features and lora_B.shape[1] == lora_A.shape[0],
                 lambda: "lora_B must be [out_features, r]")
    rows = math.prod(x.shape[:-1])
    y = x.new_empty((*x.shape[:-1], out_features))
    if _owns_lora_input(x, lora_A, dropout_p):
        lora_input = x.new_empty((rows, x.shape[-1]), dtype=lora_A.dtype)
    else:
        lora_input = x.new_empty((0,))
    return y, lora_input, x.new_empty((rows, lora_A.shape[0]), dtype=lora_A.dtype)


@torch.library.register_fake("qlora_ext::lora_linear_4bit_backward")
def _lora_linear_4bit_backward_fake(grad_y, lora_input, lora_hidden, codes, absmax, absmax_scale, absmax_mean,
                                    lora_A, lora_B, seed, blocksize, quant_type, in_features, scaling, dropout_p,
                                    grad_x):
    dx = grad_y.new_empty((*grad_y.shape[:-1], in_features)) if grad_x else grad_y.new_empty((0,))
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_B)


# lora_linear_4bit's autograd is registered in C++ (csrc/torch_bindings/lora_linear_4bit_ops.cpp): its backward
# is the lora_linear_4bit_backward op above.
