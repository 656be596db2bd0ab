"""DoRA (Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024; PEFT's use_dora=True) on a frozen,
possibly 4-bit, base: the adapted weight is split into a trained magnitude m (one per output row) and a
direction, W' = m / ||W + s B A||_row * (W + s B A). As in the paper (section 4.3) and PEFT, the norm is treated
as a constant (no gradient flows through it), so the layer computes

    y = base(x) + (m / n - 1) * W x_d + (m / n) * s * B A x_d,    n = ||W + s B A||_row (detached),

with x_d = dropout(x) (x itself when dropout is off: then W x_d is base(x) less its bias, not a second GEMM).

PEFT dequantizes the whole 4-bit weight at every forward to take that norm. Here the norm comes from the 4-bit
weight without ever making it dense:

    n_i^2 = ||W_i||^2 + 2 s B_i . (W A^T)_i + s^2 B_i (A A^T) B_i^T,

where ||W_i||^2 is taken once (LoRALinear keeps it in a buffer) and W A^T is one 4-bit GEMM with r rows (the fused
op, as for a decode step). A dense base takes the norm directly, as PEFT does. The norm is computed in float32.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .linear import linear_4bit


_TINY = torch.finfo(torch.float32).tiny


def _no_autocast(device: torch.device):
    if device.type not in ("cpu", "cuda"):   # (meta: nothing to compute, and no autocast to leave)
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


class _Rescale(torch.autograd.Function):
    """rest + scale * adapted, computed and differentiated in float32, returned in out_dtype; for scale's gradient
    it keeps adapted in out_dtype (the output's: one bf16 tensor of the output's size under autocast, not a float32
    one), while the gradients of rest and adapted are float32 (not rounded to the output's dtype)."""

    @staticmethod
    def forward(ctx, rest, scale, adapted, out_dtype):
        ctx.save_for_backward(scale, adapted.to(out_dtype))
        return (rest + scale * adapted).to(out_dtype)

    @staticmethod
    def backward(ctx, grad):
        scale, adapted = ctx.saved_tensors
        grad = grad.float()
        grad_scale = (grad * adapted.float()).reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return grad, grad_scale, grad * scale, None


def _dense_weight(base) -> torch.Tensor:
    """The base's weight in float32 (a 4-bit one dequantized: a dense copy exists for the moment)."""
    from .nn import Linear4bit
    return base.dequantized_weight(torch.float32) if isinstance(base, Linear4bit) else base.weight.float()


@torch.no_grad()
def weight_row_norms_squared(base) -> torch.Tensor:
    """||W_i||^2 of each row of the base's weight, float32 [out_features]; computed once per layer."""
    return torch.linalg.vector_norm(_dense_weight(base), dim=1).square()


@torch.no_grad()
def weight_norm(layer) -> torch.Tensor:
    """n = ||W + s B A||_row (float32 [out_features], no gradient) of a LoRALinear with use_dora."""
    from .nn import Linear4bit
    base, s = layer.base, float(layer.scaling)
    with _no_autocast(layer.lora_A.device):
        A, B = layer.lora_A.float(), layer.lora_B.float()
        if not isinstance(base, Linear4bit):
            return torch.linalg.vector_norm(base.weight.float() + s * (B @ A), dim=1).clamp_min(_TINY)
        WA = linear_4bit(A, base.weight)                     # [r, out]: one 4-bit GEMM with r rows
        cross = (B * WA.t()).sum(dim=1)
        quad = ((B @ (A @ A.t())) * B).sum(dim=1)
        squared = layer.dora_weight_sq + 2.0 * s * cross + (s * s) * quad
        # (a row of zeros has n = 0 and m = 0: a tiny n makes m / n = 0 and the row computes the base, where PEFT
        # gives NaN; the relative error of the expansion is about 1e-7 (||W_i|| / n_i)^2)
        return squared.clamp_min(_TINY).sqrt()


def _base_and_direction(base, x: torch.Tensor, dropped: torch.Tensor):
    """(base(x), W dropped) with one GEMM over both (the 4-bit weight decoded once, not twice)."""
    from .nn import Linear4bit, in_input_dtype
    both = torch.stack([x, dropped])
    if isinstance(base, Linear4bit):
        both = in_input_dtype(linear_4bit(both if base.compute_dtype is None else both.to(base.compute_dtype),
                                          base.weight, None), both.dtype)
    else:
        both = F.linear(both, base.weight)
    y, direction = both[0], both[1]
    return (y if base.bias is None else y + base.bias.to(y.dtype)), direction


def dora_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """The DoRA layer's output (see the module's docstring), in the base output's dtype."""
    base = layer.base
    if layer.scaling == 0.0:   # adapters_disabled: the base alone, whatever the magnitude learned
        return base(x)
    dropped = layer.dropout(x)
    if dropped is x:
        y = base(x)
        direction = y if base.bias is None else y - base.bias.to(y.dtype)   # W x: the base's own GEMM again
    else:
        y, direction = _base_and_direction(base, x, dropped)
    scale = layer.lora_magnitude_vector.float() / weight_norm(layer)   # m / n: the gradient reaches m only
    lora = F.linear(F.linear(dropped.to(layer.lora_A.dtype), layer.lora_A), layer.lora_B)
    # y + (m/n - 1) W x_d + (m/n) s B A x_d as y - W x_d + (m/n) (W x_d + s B A x_d): for m's gradient one tensor of
    # the output's size is kept, in the output's dtype (not two in float32)
    adapted = direction.float() + lora.float() * layer.scaling
    return _Rescale.apply(y.float() - direction.float(), scale, adapted, y.dtype)


@torch.no_grad()
def merged_weight(layer, dtype: torch.dtype) -> torch.Tensor:
    """m / n * (W + s B A) as a dense [out_features, in_features] tensor, for export."""
    w = _dense_weight(layer.base) + (layer.lora_B.float() @ layer.lora_A.float()) * layer.scaling
    return ((layer.lora_magnitude_vector.float() / weight_norm(layer))[:, None] * w).to(dtype)
