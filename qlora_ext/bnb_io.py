"""Taking over bitsandbytes' 4-bit weights without requantizing them.

A model loaded with transformers' BitsAndBytesConfig (or a pre-quantized bitsandbytes checkpoint) holds
bitsandbytes.nn.Linear4bit layers. Their packed codes are byte for byte qlora_ext's canonical layout (element
2i in the high nibble of byte i, row-major, one absmax per block) and bitsandbytes' NF4 and FP4 tables are
qlora_ext's to the bit, so such a layer converts exactly: the same codes, and absmax as the float32 values
bitsandbytes decodes them with. bitsandbytes' double quantization (absmax - offset as 8-bit dynamic-map codes
with one float32 absmax per 256) is not qlora_ext's (FP8 E4M3 codes around a mean): it is decoded to float32
(then the layer decodes to exactly the weight bitsandbytes computes with) or, asked for, re-encoded in
qlora_ext's FP8 format (0.373 bit/param less, and each absmax rounded once more).

bitsandbytes is never imported here: a layer is recognised through sys.modules, since one can only exist once
the library is loaded; the state-dict reader needs plain tensors only.
"""
from __future__ import annotations

import json
import sys
from typing import Mapping, Optional

import torch

from ._ops import BLOCKSIZES, ops
from .quantize import QuantState, code_table, dequantize

_BNB_QUANT_TYPES = ("nf4", "fp4")


def is_bnb_linear_4bit(module: torch.nn.Module) -> bool:
    """Whether module is a bitsandbytes.nn.Linear4bit (of any subclass)."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def is_bnb_linear_8bit(module: torch.nn.Module) -> bool:
    """Whether module is a bitsandbytes.nn.Linear8bitLt (LLM.int8(), which qlora_ext cannot take over)."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, getattr(bnb.nn, "Linear8bitLt", ()))


def holds_bnb_linear_4bit(model: torch.nn.Module) -> bool:
    """Whether model has bitsandbytes 4-bit layers (it was loaded 4-bit, e.g. from a pre-quantized checkpoint)."""
    return any(is_bnb_linear_4bit(m) for m in model.modules())


def is_quantized_bnb_linear_4bit(module: torch.nn.Module) -> bool:
    """Whether module is a bitsandbytes Linear4bit holding 4-bit data (its weight's or its own quant state)."""
    return is_bnb_linear_4bit(module) and (getattr(module.weight, "quant_state", None) or
                                           getattr(module, "quant_state", None)) is not None


def _dtype_named(name: str, what: str) -> torch.dtype:
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{what} names no torch dtype: {name!r}")
    return dtype


def quant_state_from_bnb(weight: torch.Tensor, absmax: torch.Tensor, quant_map: torch.Tensor, quant_type: str,
                         blocksize: int, shape, dtype: torch.dtype, nested_absmax: Optional[torch.Tensor] = None,
                         nested_quant_map: Optional[torch.Tensor] = None, nested_blocksize: Optional[int] = None,
                         nested_offset=None, double_quant: bool = False) -> QuantState:
    """qlora_ext's QuantState for the parts of a bitsandbytes 4-bit QuantState (as its attributes or its
    serialized dict name them). weight: the packed codes in any storage dtype (bitsandbytes' quant_storage);
    absmax: float32 per block, or uint8 codes when nested_* are given. double_quant=False keeps absmax as the
    float32 values bitsandbytes decodes (exactly its weights); True re-encodes them in qlora_ext's FP8 double
    quantization. The codes are not copied when they are already uint8."""
    if quant_type not in _BNB_QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {_BNB_QUANT_TYPES} (bitsandbytes' 4-bit types), got "
                         f"{quant_type!r}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES} to convert a bitsandbytes weight, got {blocksize}")
    shape = torch.Size(shape)
    numel = shape.numel()
    nblocks = -(-numel // blocksize)
    table = code_table(quant_type).to(quant_map.device)
    if quant_map.numel() != 16 or not torch.equal(quant_map.reshape(-1).float(), table):
        raise ValueError(f"quant_map is not qlora_ext's {quant_type} table (16 float32 values equal to "
                         f"qlora_ext.code_table({quant_type!r})): a custom bitsandbytes code cannot be taken over")
    codes = weight.detach().reshape(-1)
    if codes.dtype != torch.uint8:
        codes = codes.contiguous().view(torch.uint8)  # bitsandbytes' quant_storage: the same bytes, another dtype
    if codes.numel() != (numel + 1) // 2:
        raise ValueError(f"weight holds {codes.numel()} bytes of codes; a {tuple(shape)} weight needs "
                         f"{(numel + 1) // 2}")
    absmax = absmax.detach().reshape(-1)
    if absmax.numel() != nblocks:
        raise ValueError(f"absmax has {absmax.numel()} values; {numel} weights in blocks of {blocksize} need "
                         f"{nblocks}")
    if nested_absmax is not None:
        if nested_quant_map is None or nested_blocksize is None or nested_offset is None:
            raise ValueError("nested_absmax needs nested_quant_map, nested_blocksize and nested_offset")
        if absmax.dtype != torch.uint8:
            raise ValueError(f"absmax must be uint8 codes when nested (double quantized), got {absmax.dtype}")
        if nested_quant_map.numel() != 256:
            raise ValueError(f"nested_quant_map must hold 256 values, got {nested_quant_map.numel()}")
        nested_absmax = nested_absmax.detach().reshape(-1).float()
        if nested_absmax.numel() != -(-nblocks // nested_blocksize):
            raise ValueError(f"nested_absmax has {nested_absmax.numel()} values; {nblocks} absmax in blocks of "
                             f"{nested_blocksize} need {-(-nblocks // nested_blocksize)}")
        # bitsandbytes' blockwise decode, code * absmax in float32, then its offset added: the same two roundings.
        scale = nested_absmax.repeat_interleave(nested_blocksize)[:nblocks]
        offset = torch.as_tensor(nested_offset, dtype=torch.float32, device=scale.device)
        absmax = nested_quant_map.reshape(-1).float()[absmax.long()] * scale + offset
    elif not absmax.dtype.is_floating_point:
        raise ValueError(f"absmax must be floating point when not nested, got {absmax.dtype}")
    absmax = absmax.float().contiguous()
    if not bool(torch.isfinite(absmax).all()):
        raise ValueError("absmax holds inf or NaN: the bitsandbytes weight is corrupt")
    scale_fp8 = mean = None
    if double_quant:
        absmax, scale_fp8, mean = ops.quantize_absmax_fp8(absmax)
    return QuantState(codes.contiguous(), absmax, scale_fp8, mean, shape, dtype, blocksize, quant_type)


def _bnb_quant_state(module: torch.nn.Module):
    """The bitsandbytes QuantState of a Linear4bit: its weight's, or, where that was lost (FSDP, a re-wrapped
    parameter), the copy the layer keeps, as bitsandbytes itself falls back to."""
    weight = module.weight
    qs = getattr(weight, "quant_state", None) or getattr(module, "quant_state", None)
    if qs is None:
        raise ValueError("this bitsandbytes Linear4bit is not quantized yet (bitsandbytes quantizes when the layer "
                         "moves to a device): its weight is still dense, quantize it as an nn.Linear instead")
    if weight.device.type == "meta":
        raise ValueError("this bitsandbytes Linear4bit is on the meta device (no data): load its weights first")
    return qs


def bnb_takeover_problem(module: torch.nn.Module) -> Optional[str]:
    """Why a quantized bitsandbytes Linear4bit cannot become a qlora_ext Linear4bit (None if it can): a blocksize
    outside qlora_ext's, or rows that do not start blocks (bitsandbytes' blocks run across rows)."""
    qs = _bnb_quant_state(module)
    if qs.blocksize not in BLOCKSIZES:
        return f"bitsandbytes blocksize {qs.blocksize} (qlora_ext's are {BLOCKSIZES})"
    if qs.shape[-1] % qs.blocksize:
        return f"in_features {qs.shape[-1]} is not a multiple of its blocksize {qs.blocksize}"
    return None


def bnb_state_bytes(module: torch.nn.Module) -> int:
    """Bytes of a quantized bitsandbytes Linear4bit's quantization constants (absmax, code tables; nested too),
    which live in its QuantState, not in parameters or buffers."""
    qs = _bnb_quant_state(module)
    parts = [qs.absmax, qs.code] + ([qs.state2.absmax, qs.state2.code] if getattr(qs, "nested", False) else [])
    return sum(t.numel() * t.element_size() for t in parts)


def bnb_dense_weight(module: torch.nn.Module) -> torch.Tensor:
    """The weight of a quantized bitsandbytes Linear4bit, dequantized, in the dtype it was quantized from: through
    qlora_ext's format where its blocksize is one of qlora_ext's (also for a layer bitsandbytes repacked for its
    CPU kernel, which bitsandbytes' own dequantize does not read), else by bitsandbytes."""
    qs = _bnb_quant_state(module)
    if qs.blocksize in BLOCKSIZES:
        return dequantize(quant_state_from_bnb_module(module))
    if getattr(qs, "packing_format_for_cpu", False):
        raise ValueError(f"this bitsandbytes Linear4bit (blocksize {qs.blocksize}) has been repacked for "
                         "bitsandbytes' CPU inference kernel, which only its own kernel reads: reload it, and set "
                         "support_avx512bf16_for_cpu = False before running it on the CPU")
    return sys.modules["bitsandbytes"].functional.dequantize_4bit(module.weight.data, qs)


def quant_state_from_bnb_module(module: torch.nn.Module, double_quant: bool = False) -> QuantState:
    """The QuantState of a quantized bitsandbytes.nn.Linear4bit's weight (see quant_state_from_bnb)."""
    weight = module.weight
    qs = _bnb_quant_state(module)
    if getattr(qs, "packing_format_for_cpu", False):
        return _from_cpu_packed(weight.data, qs, double_quant)
    nested = bool(getattr(qs, "nested", False))
    state2 = qs.state2 if nested else None
    return quant_state_from_bnb(
        weight.data, qs.absmax, qs.code, qs.quant_type, qs.blocksize, qs.shape, qs.dtype,
        nested_absmax=state2.absmax if nested else None, nested_quant_map=state2.code if nested else None,
        nested_blocksize=state2.blocksize if nested else None, nested_offset=qs.offset if nested else None,
        double_quant=double_quant)


def _from_cpu_packed(packed: torch.Tensor, qs, double_quant: bool, block_n: int = 32) -> QuantState:
    """A layer bitsandbytes repacked for its CPU inference kernel (the first forward in eval mode without
    gradients on a CPU with AVX512-BF16 does that): codes as [N, K/2] bytes where, per block_n rows and byte
    column, 32 bytes hold the low nibbles of a [block_n, 2] tile's codes and their high nibbles in turn, and absmax
    as bfloat16 [K / blocksize, N]. Undone exactly; absmax keeps the bfloat16 values bitsandbytes now computes
    with (the float32 ones are gone)."""
    n, k = qs.shape
    half = packed.reshape(-1, 32)
    tile = torch.cat([half & 0xF, half >> 4], dim=-1)               # the 64 codes of a [32 rows, 2] column pair
    codes = tile.reshape(n // block_n, k // 2, block_n, 2).transpose(1, 2).reshape(-1)  # row-major, one per byte
    absmax = qs.absmax.T.reshape(-1)
    return quant_state_from_bnb(codes[0::2] << 4 | codes[1::2], absmax, qs.code, qs.quant_type, qs.blocksize,
                                qs.shape, getattr(qs, "original_dtype", torch.bfloat16), double_quant=double_quant)


def quant_state_from_bnb_tensors(tensors: Mapping[str, torch.Tensor], prefix: str = "",
                                 double_quant: bool = False) -> QuantState:
    """The QuantState stored in a bitsandbytes 4-bit checkpoint (what a pre-quantized model's safetensors hold):
    tensors is the state dict (safetensors.torch.load_file), prefix the weight's key, e.g.
    "model.layers.0.mlp.up_proj.weight". Reads `prefix`, `.absmax`, `.quant_map`, `.nested_absmax`,
    `.nested_quant_map` and the packed `.quant_state.bitsandbytes__nf4` (or __fp4) of JSON fields."""
    keys = [k for k in (f"{prefix}.quant_state.bitsandbytes__{t}" for t in _BNB_QUANT_TYPES) if k in tensors]
    if len(keys) != 1:
        raise KeyError(f"no bitsandbytes 4-bit weight at {prefix!r}: expected exactly one of "
                       f"{prefix}.quant_state.bitsandbytes__nf4 / __fp4 in the state dict")
    fields = json.loads(bytes(tensors[keys[0]].reshape(-1).tolist()).decode("utf-8"))
    missing = [k for k in (prefix, f"{prefix}.absmax", f"{prefix}.quant_map") if k not in tensors]
    nested = "nested_blocksize" in fields
    if nested:
        missing += [k for k in (f"{prefix}.nested_absmax", f"{prefix}.nested_quant_map") if k not in tensors]
    if missing:
        raise KeyError(f"the bitsandbytes weight at {prefix!r} lacks {missing}")
    if fields.get("shape") is None:
        raise ValueError(f"the bitsandbytes weight at {prefix!r} does not record its shape")
    return quant_state_from_bnb(
        tensors[prefix], tensors[f"{prefix}.absmax"], tensors[f"{prefix}.quant_map"], fields["quant_type"],
        int(fields["blocksize"]), fields["shape"], _dtype_named(fields["dtype"], f"{keys[0]}'s dtype"),
        nested_absmax=tensors[f"{prefix}.nested_absmax"] if nested else None,
        nested_quant_map=tensors[f"{prefix}.nested_quant_map"] if nested else None,
        nested_blocksize=int(fields["nested_blocksize"]) if nested else None,
        nested_offset=float(fields["nested_offset"]) if nested else None, double_quant=double_quant)
