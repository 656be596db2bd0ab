"""Blockwise 4-bit quantization (NF4, FP4, INT4) with optional FP8 double quantization of the absmax.

    q = quantize(w)                 # any shape, float32/float16/bfloat16, CPU or CUDA
    w_hat = dequantize(q)           # same shape and dtype as w
    q.bits_per_param()              # 4.127 at blocksize 64 with double quantization, 4.5 without

Format (the canonical layout every kernel reads): the tensor is flattened in row-major order and cut into
blocks of `blocksize` elements (the last may be partial). codes: uint8 [ceil(numel/2)], element 2i in the
high nibble of byte i. Each block has one absmax; a value decodes as table[code] * absmax rounded once to
the output dtype. With double quantization the absmax are stored as FP8 E4M3 codes (uint8 holding
torch.float8_e4m3fn bit patterns) around one fp32 mean, with one fp32 scale per 256 absmax:
absmax = max(0, fp8 * scale + mean).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from . import _C
from ._ops import BLOCKSIZES, QUANT_TYPES, ops

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def code_table(quant_type: str = "nf4") -> torch.Tensor:
    """The 16 float32 values of a 4-bit code table, indexed by code (the table the kernels use)."""
    return torch.tensor(_C.code_table(quant_type), dtype=torch.float32)


@dataclasses.dataclass
class QuantState:
    """A 4-bit quantized tensor: packed codes plus the constants needed to decode them.

    codes:        uint8 [ceil(numel/2)]
    absmax:       float32 [nblocks], or uint8 [nblocks] FP8 E4M3 codes when double quantized
    absmax_scale: float32 [ceil(nblocks/256)] (double quantization only)
    absmax_mean:  float32 [1] (double quantization only)
    """

    codes: torch.Tensor
    absmax: torch.Tensor
    absmax_scale: Optional[torch.Tensor]
    absmax_mean: Optional[torch.Tensor]
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def __matmul__(self, other):
        # (model code that computes with `layer.weight` directly, as Mamba's dt_proj: on an adapted layer that would
        # also skip its LoRA adapter)
        raise TypeError("a QuantState is a 4-bit weight, not a tensor: call its layer (a model computing with "
                        "`layer.weight` directly would also skip a LoRA adapter on it; leave that layer out of "
                        "target_modules), or qlora_ext.dequantize(q) for the dense weight")

    __rmatmul__ = __matmul__

    def tensors(self) -> dict:
        """The buffers that hold the data (plain tensors, safetensors-friendly)."""
        out = {"codes": self.codes, "absmax": self.absmax}
        if self.double_quant:
            out["absmax_scale"] = self.absmax_scale
            out["absmax_mean"] = self.absmax_mean
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def bits_per_param(self) -> float:
        """Storage cost measured from the real buffers: 8 * bytes / numel."""
        return 8.0 * self.nbytes() / max(self.numel(), 1)

    def to(self, device) -> "QuantState":
        """Moves the packed data (no requantization)."""
        moved = {k: v.to(device) for k, v in self.tensors().items()}
        return dataclasses.replace(self, codes=moved["codes"], absmax=moved["absmax"],
                                   absmax_scale=moved.get("absmax_scale"), absmax_mean=moved.get("absmax_mean"))

    def absmax_f32(self) -> torch.Tensor:
        """The first-level absmax as float32 (decoded from FP8 when double quantized)."""
        if not self.double_quant:
            return self.absmax
        return ops.dequantize_absmax_fp8(self.absmax, self.absmax_scale, self.absmax_mean)


def _check_quant_args(blocksize, quant_type):
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")


def quantize(w: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = True) -> QuantState:
    """Quantizes w (float32/float16/bfloat16, any shape, CPU or CUDA) to 4-bit codes.

    Raises ValueError if w holds inf or NaN (saying how many), TypeError for other dtypes.
    On CUDA this reads one int back from the device (the non-finite count), i.e. it synchronizes.
    """
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"w must be float32, float16 or bfloat16, got {w.dtype}")
    _check_quant_args(blocksize, quant_type)
    codes, absmax, nonfinite = ops.quantize_4bit(w.detach(), blocksize, quant_type)
    bad = int(nonfinite.item())
    if bad:
        raise ValueError(f"w has {bad} non-finite value(s) (inf or NaN) out of {w.numel()}; cannot quantize")
    scale = mean = None
    if double_quant:
        absmax, scale, mean = ops.quantize_absmax_fp8(absmax)
    return QuantState(codes, absmax, scale, mean, w.shape, w.dtype, blocksize, quant_type)


def dequantize(q: QuantState, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The dense tensor of q: its original shape, in dtype (default: the dtype it was quantized from)."""
    dtype = q.dtype if dtype is None else dtype
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    return ops.dequantize_4bit(q.codes, q.absmax, q.absmax_scale, q.absmax_mean, q.blocksize, q.quant_type,
                               list(q.shape), dtype)
