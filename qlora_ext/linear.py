"""y = x @ W^T + b with W stored 4-bit: the functional form used by qlora_ext.nn.Linear4bit."""
from typing import Optional

import torch

from . import _C
from ._ops import ops
from .quantize import QuantState


def set_linear_backend(backend: str) -> None:
    """Chooses the CUDA implementation of linear_4bit for the whole process: "auto" (the dispatcher's
    choice by GPU, direction and M from the measured routing table, qlora_ext.routing; dequantize + cuBLAS
    where the table has no rule: everywhere until a GPU's fused kernels have been validated and measured),
    "fused" (the fused kernels where they apply: bf16/fp16, blocksize 64; small-M kernels for M <= 64,
    large-M kernels above: wgmma on Hopper when the build has sm_90a, mma.sync otherwise; not yet validated
    on a GPU), "fused_mma" ("fused" with the mma.sync large-M kernels on every GPU), "dequant"
    (dequantize, then cuBLAS) or "tune" (measures dequantize + cuBLAS and every fused kernel that applies the
    first time a class of problem is seen: same dtype, direction, N, K and M up to the same power of two; keeps
    the fastest; qlora_ext._C.linear_tuning_cache() lists the choices). CPU always dequantizes tiles of W and
    multiplies them."""
    _C.set_linear_backend(backend)


def fused_large_kernel(device=None) -> str:
    """Which large-M kernel backend "fused" runs on a CUDA device (default: the current one): "wgmma" (Hopper,
    with the build's sm_90a image loaded) or "mma.sync"; "none" in a build without CUDA kernels."""
    if not hasattr(_C, "fused_large_kernel") or not torch.cuda.is_available():
        return "none"
    index = None if device is None else torch.device(device).index
    return _C.fused_large_kernel(torch.cuda.current_device() if index is None else index)


def linear_backend() -> str:
    return _C.linear_backend()


def _check_in_features(x: torch.Tensor, weight: QuantState) -> None:
    if x.shape[-1:] != weight.shape[1:]:
        raise ValueError(f"x's last dimension ({x.shape[-1] if x.dim() else 'scalar'}) must equal in_features "
                         f"({weight.shape[1]})")


def linear_4bit(x: torch.Tensor, weight: QuantState, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [..., K] (bfloat16/float16/float32; float64 on CPU) @ W^T for W [N, K] quantized in `weight`,
    plus bias [N]. Returns [..., N] in x's dtype. Differentiable in x and bias (W is frozen).

    Under torch.autocast, x and bias are cast to the autocast dtype first (the weight's constants stay
    float32)."""
    if len(weight.shape) != 2:
        raise ValueError(f"weight must be a quantized 2-D [out_features, in_features] matrix, got shape "
                         f"{tuple(weight.shape)}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    _check_in_features(x, weight)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x = x.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    return ops.linear_4bit(x, weight.codes, weight.absmax, weight.absmax_scale, weight.absmax_mean, bias,
                           weight.blocksize, weight.quant_type, weight.shape[0])


_NO_SEED = {torch.device("cpu"): torch.zeros(1, dtype=torch.int64)}


def _no_seed(device: torch.device) -> torch.Tensor:
    """The seed argument when there is no dropout (never read), on x's device: a CPU tensor among CUDA ones
    would keep torch.compile from capturing the layer in a CUDA graph. Made once per device in eager mode;
    a traced graph makes its own (one int64)."""
    if torch.compiler.is_compiling():
        return torch.zeros(1, dtype=torch.int64, device=device)
    seed = _NO_SEED.get(device)
    if seed is None:
        with torch.inference_mode(False):  # (an inference tensor could not be saved for a later backward)
            seed = _NO_SEED[device] = torch.zeros(1, dtype=torch.int64, device=device)
    return seed


def lora_linear_4bit(x: torch.Tensor, weight: QuantState, lora_A: torch.Tensor, lora_B: torch.Tensor,
                     scaling: float, dropout_p: float = 0.0, seed: Optional[torch.Tensor] = None,
                     bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x @ W^T + bias + scaling * dropout(x) @ lora_A^T @ lora_B^T as one op (what qlora_ext.nn.LoRALinear
    computes on a Linear4bit base): W [N, K] quantized in `weight`, lora_A [r, K], lora_B [N, r].
    Differentiable in x, lora_A, lora_B and bias; W is frozen. The adapter's arithmetic runs in the adapters'
    dtype, y has x's dtype. dropout_p > 0 needs `seed` (an int64 tensor of one element, on the CPU or on x's
    CUDA device; qlora_ext.nn.draw_seed): the mask is the qlora_ext::dropout op's for that seed, regenerated
    in the backward pass rather than stored.

    Under torch.autocast, x, bias and the adapters are cast to the autocast dtype first (as F.linear's
    inputs would be)."""
    _check_in_features(x, weight)
    if dropout_p > 0.0 and seed is None:
        raise ValueError("dropout_p > 0 needs a seed: an int64 tensor of one element (qlora_ext.nn.draw_seed)")
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, lora_A, lora_B = x.to(dtype), lora_A.to(dtype), lora_B.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    y, _, _ = ops.lora_linear_4bit(x, weight.codes, weight.absmax, weight.absmax_scale, weight.absmax_mean, bias,
                                   lora_A, lora_B, _no_seed(x.device) if seed is None else seed, weight.blocksize,
                                   weight.quant_type, weight.shape[0], float(scaling), float(dropout_p))
    return y
