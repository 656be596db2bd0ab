"""LoftQ initialisation of LoRA adapters on a quantized base (Li et al., "LoftQ: LoRA-Fine-Tuning-Aware
Quantization for Large Language Models", ICLR 2024; PEFT's init_lora_weights="loftq").

QLoRA starts from B = 0, i.e. from the quantized model, whose quantization error the adapters must then learn
away. LoftQ starts the adapters at the best rank-r approximation of that error instead: alternately quantize
W - s B A (s: the adapters' scaling, alpha / r or rsLoRA's alpha / sqrt(r)) and set s B A to the rank-r
truncated SVD of W - dequantize(Q). After one iteration the remaining error is the part of W - dequantize(Q(W))
beyond its r largest singular values. The quantized base is then Q(W - s B A) of the last iteration, so base +
adapter is closer to W than the quantized W alone.

The adapters then describe base-specific values: the trained change is s (B A - B0 A0), a rank <= 2r update of W,
which qlora_ext.peft_io writes for PEFT when it exports a LoftQ model (see LoRALinear.lora_A_init).
"""
import math
from typing import Tuple

import torch

from .quantize import QuantState, dequantize, quantize


LOFTQ_SVDS = ("exact", "randomized")


def _top_singular(residual: torch.Tensor, k: int, svd: str):
    """(u [m, k], s [k], vh [k, n]) of residual's k largest singular values: exact (torch.linalg.svd), or by
    torch.svd_lowrank (randomized range finder, 16 extra columns, 4 power iterations) with its random start seeded,
    so the same weight gives the same adapters (a resumed run recomputes them)."""
    if svd == "exact":
        u, s, vh = torch.linalg.svd(residual, full_matrices=False)
        return u[:, :k], s[:k], vh[:k]
    q = min(k + 16, *residual.shape)
    devices = [residual.device] if residual.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        u, s, v = torch.svd_lowrank(residual, q=q, niter=4)
    return u[:, :k], s[:k], v[:, :k].T


def loftq_init(weight: torch.Tensor, r: int, scaling: float, quant_type: str = "nf4", blocksize: int = 64,
               double_quant: bool = True, iters: int = 1,
               svd: str = "exact") -> Tuple[QuantState, torch.Tensor, torch.Tensor]:
    """(quantized base, lora_A [r, in], lora_B [out, r]) for weight [out, in], both adapters float32 on
    weight's device, such that dequantize(base) + scaling * B @ A approximates weight. svd="exact" computes the
    truncated SVD exactly (torch.linalg.svd in float64 on the CPU, float32 on a GPU; its cost grows with the
    layer's size: about 2 s for 2048 x 2048 on two CPU cores); "randomized" approximates it (torch.svd_lowrank:
    30-80x faster there, the error left 0.5-1% larger than exact's at r = 16-64 on SmolLM2's layers)."""
    if iters < 1:
        raise ValueError(f"loftq iters must be at least 1, got {iters}")
    if r < 1:
        raise ValueError(f"r must be a positive integer, got {r}")
    if not scaling > 0:
        raise ValueError(f"LoftQ needs a positive scaling (it splits the error's singular values between "
                         f"B and A by their square roots), got {scaling}")
    if svd not in LOFTQ_SVDS:
        raise ValueError(f"loftq svd must be one of {LOFTQ_SVDS}, got {svd!r}")
    w = weight.detach().to(torch.float32)
    # float64 where it is cheap (CPU): the truncated SVD is the algorithm's only approximation
    svd_dtype = torch.float64 if w.device.type == "cpu" else torch.float32
    k = min(r, *w.shape)  # ranks beyond the layer's own start as LoRA's default does: A Kaiming, B zero
    lora_A = torch.zeros(r, w.shape[1], device=w.device)
    if k < r:
        torch.nn.init.kaiming_uniform_(lora_A[k:], a=math.sqrt(5))
    lora_B = torch.zeros(w.shape[0], r, device=w.device)
    for _ in range(iters):
        q = quantize(w - scaling * (lora_B @ lora_A), blocksize, quant_type, double_quant)
        residual = (w - dequantize(q, torch.float32)).to(svd_dtype)
        u, s, vh = _top_singular(residual, k, svd)
        root = (s / scaling).sqrt()
        lora_B[:, :k] = (u * root).to(torch.float32)
        lora_A[:k] = (root[:, None] * vh).to(torch.float32)
    return q, lora_A.contiguous(), lora_B.contiguous()
