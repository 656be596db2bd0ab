"""Modules: a frozen 4-bit linear layer (Linear4bit), a LoRA adapter (LoRALinear), and prepare_model,
which turns the nn.Linear layers of any model (Hugging Face transformers models included) into
4-bit bases with trainable adapters."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import numbers
import re
import warnings
import weakref
from typing import Iterable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from torch.nn import functional as F

from . import dora, lora_patterns
from ._ops import BLOCKSIZES, QUANT_TYPES, ops
from .bnb_io import (bnb_dense_weight, bnb_state_bytes, bnb_takeover_problem, holds_bnb_linear_4bit,
                     is_bnb_linear_4bit, is_bnb_linear_8bit, is_quantized_bnb_linear_4bit,
                     quant_state_from_bnb_module)
from .hf_quantization import forget_quantization, mark_quantized
from .linear import linear_4bit, lora_linear_4bit
from .loftq import LOFTQ_SVDS, loftq_init
from .modules_to_save import ModuleToSave, matches, unwrap_trained, wrap_modules_to_save
from .trainable_tokens import (TiedTokensHead, TrainableTokens, head_trained_whole_and_tied, plan_trainable_tokens,
                               tied_to, unwrap_trainable_tokens, wrap_trainable_tokens)
from .quantize import QuantState, dequantize, quantize

_QUANT_BUFFERS = ("weight_codes", "weight_absmax", "weight_absmax_scale", "weight_absmax_mean")
DENSE_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)   # (what save_4bit records)
_WEIGHT_DTYPES = (*DENSE_WEIGHT_DTYPES, torch.float64)                   # (float64: gradcheck on the CPU)
_COMPUTE_DTYPES = _WEIGHT_DTYPES


def checked_compute_dtype(value) -> Optional[torch.dtype]:
    """compute_dtype as given (None, a floating torch.dtype, or its name: "bfloat16", as transformers'
    bnb_4bit_compute_dtype takes it), as a torch.dtype; ValueError naming it otherwise."""
    dtype = getattr(torch, value.removeprefix("torch."), None) if isinstance(value, str) else value
    if value is not None and dtype not in _COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be None or one of {[str(d) for d in _COMPUTE_DTYPES]} (or its name, "
                         f"'bfloat16'), got {value!r}")
    return dtype


def check_adapter_settings(r, alpha, dropout) -> None:
    """ValueError naming the first of r (a positive integer), alpha (a finite number) and dropout (a
    probability) that is not."""
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r <= 0:
        raise ValueError(f"r must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout <= 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1], got {dropout!r}")


# A buffer saying what the codes mean (an nf4 and an fp4 weight have the same buffers, shapes and dtypes): JSON
# in a uint8 tensor, as bitsandbytes keeps its quant state, so state dicts stay plain tensors; a real buffer of
# a fixed size (space-padded), so that tools setting state dict entries one tensor at a time (accelerate's
# device_map loading, torch.distributed.checkpoint) find it. state_dict() writes the layer's format under the
# key and load_state_dict reads it from there; the buffer's own bytes are a placeholder (accelerate, which sets
# tensors without load_state_dict, does not make the layer take a saved format).
FORMAT_KEY = "weight_format"
_FORMAT_BYTES = 128


def _format_tensor(layer: "Linear4bit") -> torch.Tensor:
    text = json.dumps({"quant_type": layer.quant_type, "blocksize": layer.blocksize,
                       "double_quant": layer.double_quant,
                       "weight_dtype": str(layer.weight_dtype).removeprefix("torch.")}, sort_keys=True)
    return torch.tensor(list(text.ljust(_FORMAT_BYTES).encode()), dtype=torch.uint8)


def _read_format(t) -> dict:
    """The format a FORMAT_KEY tensor holds; ValueError if it is not one."""
    try:
        fmt = json.loads(bytes(t.detach().to("cpu", torch.uint8).flatten().tolist()).decode())
        dtype = getattr(torch, fmt["weight_dtype"], None)
        if (fmt["quant_type"] not in QUANT_TYPES or fmt["blocksize"] not in BLOCKSIZES
                or type(fmt["double_quant"]) is not bool or dtype not in _WEIGHT_DTYPES):
            raise ValueError(fmt)
    except Exception as e:   # (not JSON, not a mapping, a key missing or unknown)
        raise ValueError(f"not a 4-bit weight format: {e}") from None
    return dict(fmt, weight_dtype=dtype)


def in_input_dtype(y: torch.Tensor, x_dtype: torch.dtype) -> torch.Tensor:
    """A 4-bit layer's output in its input's dtype, as bitsandbytes' Linear4bit gives it: a compute_dtype
    (bfloat16 for a float32 model) is the GEMM's dtype alone, so the next layers see the model's dtype. Under
    autocast, the autocast dtype, as nn.Linear gives."""
    if y.dtype == x_dtype or torch.is_autocast_enabled(y.device.type):
        return y
    return y.to(x_dtype)


class Linear4bit(nn.Module):
    """A frozen linear layer whose weight [out_features, in_features] is stored 4-bit.

    Buffers (plain tensors, so state_dict works with torch.save and safetensors): weight_codes uint8,
    weight_absmax (float32, or uint8 FP8 codes with double quantization), weight_absmax_scale and
    weight_absmax_mean (double quantization only). `.to(device)` moves them as they are; `.to(dtype)`
    and `.half()` leave them alone (they are a storage format, not values). compute_dtype, if set, is the
    dtype x is cast to before the matmul (e.g. torch.bfloat16 for an fp32 model); the output has x's dtype.
    weight_dtype is the dtype of the dense weight the layer stands for (what dequantized_weight and
    merge_and_unload give): the dense weight's when quantized, then whatever .to(dtype) / .half() say."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, quant_type: str = "nf4",
                 blocksize: int = 64, double_quant: bool = True, compute_dtype: Optional[torch.dtype] = None,
                 weight_dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        if in_features % blocksize:
            raise ValueError(f"in_features ({in_features}) must be a multiple of blocksize ({blocksize})")
        self.in_features, self.out_features = in_features, out_features
        self.quant_type, self.blocksize, self.double_quant = quant_type, blocksize, double_quant
        self.compute_dtype, self.weight_dtype = checked_compute_dtype(compute_dtype), weight_dtype
        # Placeholder weights (zeros) until from_linear or load_state_dict fills them.
        q = quantize(torch.zeros(out_features, in_features, device=device), blocksize, quant_type, double_quant)
        self._set_quant_state(q)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: Optional[torch.dtype] = None) -> "Linear4bit":
        """Quantizes linear's weight (on its device); the bias is kept in its dtype, frozen."""
        if linear.in_features % blocksize:
            raise ValueError(f"in_features ({linear.in_features}) must be a multiple of blocksize ({blocksize})")
        q = quantize(linear.weight.detach(), blocksize, quant_type, double_quant)
        return cls.from_quantized(q, linear.bias, compute_dtype)

    @classmethod
    def from_quantized(cls, q: QuantState, bias: Optional[torch.Tensor] = None,
                       compute_dtype: Optional[torch.dtype] = None) -> "Linear4bit":
        """A layer around an already quantized weight [out_features, in_features] (e.g. LoftQ's); the bias,
        if any, is copied, frozen."""
        if len(q.shape) != 2 or q.shape[1] % q.blocksize:
            raise ValueError(f"q must be a 2-D weight whose in_features is a multiple of its blocksize, got shape "
                             f"{tuple(q.shape)} with blocksize {q.blocksize}")
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.out_features, m.in_features = q.shape
        m.quant_type, m.blocksize, m.double_quant = q.quant_type, q.blocksize, q.double_quant
        m.compute_dtype, m.weight_dtype = checked_compute_dtype(compute_dtype), q.dtype
        m._set_quant_state(q)
        m.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        return m

    @classmethod
    def from_bnb(cls, layer: nn.Module, double_quant: bool = False,
                 compute_dtype: Optional[torch.dtype] = None) -> "Linear4bit":
        """Takes over a quantized bitsandbytes.nn.Linear4bit (e.g. from transformers' BitsAndBytesConfig or a
        pre-quantized checkpoint) without requantizing: the same codes, on the same device. double_quant=False
        keeps absmax as the float32 values bitsandbytes decodes, so the layer computes with exactly bitsandbytes'
        weight; True re-encodes them in qlora_ext's FP8 double quantization (qlora_ext.bnb_io). bitsandbytes'
        own compute_dtype is not inherited: compute_dtype here has Linear4bit's meaning (None: x's dtype)."""
        if not is_bnb_linear_4bit(layer):
            raise TypeError(f"layer must be a bitsandbytes.nn.Linear4bit, got {type(layer).__name__}")
        return cls.from_quantized(quant_state_from_bnb_module(layer, double_quant), layer.bias, compute_dtype)

    def _set_quant_state(self, q: QuantState) -> None:
        if self.weight_dtype not in _WEIGHT_DTYPES:
            raise ValueError(f"weight_dtype must be one of {[str(d) for d in _WEIGHT_DTYPES]}, got "
                             f"{self.weight_dtype}")
        for name, t in zip(_QUANT_BUFFERS, (q.codes, q.absmax, q.absmax_scale, q.absmax_mean)):
            self.register_buffer(name, t)
        self.register_buffer(FORMAT_KEY, _format_tensor(self).to(q.codes.device))

    @property
    def weight(self) -> QuantState:
        """The quantized weight (a view of the buffers, not a copy)."""
        return QuantState(self.weight_codes, self.weight_absmax, self.weight_absmax_scale, self.weight_absmax_mean,
                          torch.Size((self.out_features, self.in_features)), self.weight_dtype, self.blocksize,
                          self.quant_type)

    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return dequantize(self.weight, dtype or self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_dtype = x.dtype
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return in_input_dtype(linear_4bit(x, self.weight, bias), x_dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # the format the layer has now (the buffer itself is a placeholder of the right size: .half() and a load
        # change the format without writing to it, so a state_dict() never modifies the module)
        buffer = self._buffers.get(FORMAT_KEY)
        destination[prefix + FORMAT_KEY] = _format_tensor(self).to(
            buffer.device if buffer is not None and not buffer.is_meta else self.weight_codes.device)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Takes the saved format's quant_type and weight_dtype (the codes mean what they meant where saved: an
        fp4 state dict makes an nf4 placeholder an fp4 layer); another blocksize or double quantization (other
        buffers) is an error. A state dict without the key (older, or built by hand) leaves the format as is.
        The key is read here, not copied into the buffer (any length is read)."""
        key = prefix + FORMAT_KEY
        if key in state_dict:
            try:
                fmt = _read_format(state_dict.pop(key))   # (torch hands each module its own dict)
            except ValueError as e:
                error_msgs.append(f"{key}: {e}")
            else:
                if (fmt["blocksize"], fmt["double_quant"]) != (self.blocksize, self.double_quant):
                    error_msgs.append(
                        f"{prefix.rstrip('.') or 'the layer'}: the state dict holds a 4-bit weight with blocksize "
                        f"{fmt['blocksize']}, double_quant={fmt['double_quant']}, this layer has blocksize "
                        f"{self.blocksize}, double_quant={self.double_quant}: build it with the saved settings "
                        "(prepare_model's blocksize= and double_quant=)")
                else:
                    self.quant_type, self.weight_dtype = fmt["quant_type"], fmt["weight_dtype"]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if key in missing_keys:   # (read above, or an older state dict: the layer's own format stands)
            missing_keys.remove(key)
        buffer = self._buffers.get(FORMAT_KEY)
        if buffer is None or buffer.device != self.weight_codes.device:   # (a meta model loaded with assign=True)
            self._buffers[FORMAT_KEY] = _format_tensor(self).to(self.weight_codes.device)

    def _apply(self, fn, recurse=True):
        # .to(dtype), .half(), .float(): the dense weight this layer stands for takes the new dtype, as an
        # nn.Linear's would (dequantized_weight and merge_and_unload give it), asked of fn on an empty tensor
        moved = fn(torch.empty(0, dtype=self.weight_dtype)).dtype
        if moved in DENSE_WEIGHT_DTYPES:
            self.weight_dtype = moved
        # nn.Module.to(dtype) would cast the float32 constants of the format: move them, never cast them.
        kept = {n: self._buffers[n] for n in _QUANT_BUFFERS if self._buffers.get(n) is not None}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={self.quant_type}, blocksize={self.blocksize}, double_quant={self.double_quant}")


def draw_seed(device: torch.device | str | None = None) -> torch.Tensor:
    """A dropout seed for data on `device`: one int64 from torch's generator of that device, so torch.manual_seed
    makes masks reproducible. On CUDA the seed stays on the GPU and the kernel reads it there: no copy to the
    host, and a captured CUDA graph draws a new seed, so a new mask, at every replay (torch's CUDA generator is
    graph-safe), where a host-drawn seed would be frozen into the graph."""
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda":
        # 63 random bits: torch.compile's own randint computes high - low in int64, which the full range overflows
        return torch.randint(-(2**62), 2**62, (1,), dtype=torch.int64, device=device)
    return torch.randint(-(2**63), 2**63 - 1, (1,), dtype=torch.int64)


class Dropout(nn.Module):
    """nn.Dropout with a counter-based mask (the qlora_ext::dropout op): the mask is a function of a seed drawn
    from torch's CPU generator and of the element index, so backward regenerates it instead of storing it, and
    the CPU kernel generates it with vector code (torch's CPU dropout draws its Bernoulli mask one element at
    a time: it was a sixth of a LoRA training step on CPU). Same distribution and scaling as nn.Dropout, not
    the same mask; reproducible under torch.manual_seed and across gradient-checkpoint recomputation, which
    restores the generators. The seed comes from the generator of x's device (see draw_seed): on CUDA it never
    leaves the GPU, so CUDA graphs replay with fresh masks. (torch.utils.checkpoint restores the CUDA generator
    of the devices of the tensors passed to it as positional arguments, as Hugging Face decoder layers pass
    hidden_states: a checkpointed function that reaches its CUDA input otherwise would recompute another mask.)"""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return ops.dropout(x, draw_seed(x.device), self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """The factor of the low-rank product: alpha / r, or with rsLoRA (Kalajdzievski 2023, PEFT's use_rslora)
    alpha / sqrt(r), which keeps the update's size from shrinking as r grows (QLoRA's r = 64 trains at the
    rate r = 1 does)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class BaseWeight:
    """What LoRALinear.weight gives for a dense base: the weight's dtype, device and shape (what model code and
    tools read of a layer's weight), not the tensor. Computing with it fails, naming the reason: code that takes
    `layer.weight` into its own matmul (Mamba's dt_proj, fused kernels given the weights) would compute without the
    adapter, silently, where this layer is adapted."""

    __slots__ = ("dtype", "device", "shape", "requires_grad")   # (_WHY: a class attribute)

    def __init__(self, weight: torch.Tensor):
        self.dtype, self.device, self.shape, self.requires_grad = weight.dtype, weight.device, weight.shape, False

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dim(self) -> int:
        return len(self.shape)

    def size(self, dim: Optional[int] = None):
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return self.shape.numel()

    def __repr__(self) -> str:
        return f"BaseWeight(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"

    _WHY = ("a LoRALinear's .weight gives its base weight's dtype, device and shape only: code computing with the "
            "weight directly (not calling the layer, as Mamba's dt_proj) would skip the LoRA adapter; leave that "
            "layer out of target_modules, or merge_and_unload first")

    @staticmethod
    def _refuse(*args, **kwargs):
        raise TypeError(BaseWeight._WHY)

    __matmul__ = __rmatmul__ = __mul__ = __rmul__ = __add__ = __radd__ = __getitem__ = _refuse

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls._refuse()

    def __getattr__(self, name):   # (an AttributeError: hasattr(layer.weight, "quant_state") is False)
        raise AttributeError(name if name.startswith("__") else f"BaseWeight has no {name!r}: {BaseWeight._WHY}")


class LoRALinear(nn.Module):
    """base(x) + dropout(x) @ A^T @ B^T * scaling, with the base frozen; scaling = alpha / r, or alpha / sqrt(r)
    with use_rslora (lora_scaling). With use_dora, DoRA (qlora_ext.dora): a trained magnitude per output row,
    lora_magnitude_vector [out_features], rescales the adapted weight's rows.

    lora_A [r, in_features] starts Kaiming-uniform, lora_B [out_features, r] starts at zero (and the magnitude at
    the base's row norms), so the initial output equals the base's. The adapters are float32 by default; the
    low-rank product runs in their dtype and is added in the base output's dtype."""

    use_rslora = False   # (what a module pickled before rsLoRA or DoRA existed computes)
    use_dora = False

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 adapter_dtype: torch.dtype = torch.float32, use_rslora: bool = False, use_dora: bool = False):
        super().__init__()
        check_adapter_settings(r, alpha, dropout)
        if not isinstance(base, (nn.Linear, Linear4bit)):
            raise TypeError(f"base must be nn.Linear or Linear4bit, got {type(base).__name__}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.r, self.alpha, self.use_rslora = int(r), alpha, bool(use_rslora)
        self.scaling = lora_scaling(r, alpha, self.use_rslora)
        device = base.weight_codes.device if isinstance(base, Linear4bit) else base.weight.device
        self.lora_A = nn.Parameter(torch.empty(self.r, base.in_features, device=device, dtype=adapter_dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, self.r, device=device, dtype=adapter_dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = Dropout(dropout) if dropout > 0 else nn.Identity()
        # Where a non-zero initialisation (LoftQ) starts the adapters: the trained change of the layer is then
        # scaling * (B A - B0 A0), what qlora_ext.peft_io exports. None for the zero-start default. Plain
        # attributes in CPU memory, not buffers: only an export reads them, so they take no GPU memory (two fp32
        # copies of the adapters, 1.3 GB for LLaMA-7B at r = 64), and they are not in the state_dict
        # (prepare_model computes them again with the base they belong to).
        self.lora_A_init: Optional[torch.Tensor] = None
        self.lora_B_init: Optional[torch.Tensor] = None
        self.use_dora = bool(use_dora)
        if self.use_dora:
            # ||W_i||^2 of a 4-bit base, taken once (dora.weight_norm) and again whenever load_state_dict fills
            # the base; float32 whatever .to(dtype) says; not in the state_dict: it belongs to the base
            self.register_buffer("dora_weight_sq", dora.weight_row_norms_squared(base)
                                 if isinstance(base, Linear4bit) else None, persistent=False)
            if isinstance(base, Linear4bit):
                # on the base, so that loading it alone refreshes them too (torch runs each submodule's post hooks:
                # loading the layer or the model runs it as well)
                _drop_refresh_hooks(base)   # of an earlier layer on this base
                base.register_load_state_dict_post_hook(_RefreshDoraNorms(self))
            # float32 whatever adapter_dtype is: a rounded magnitude would make a fresh layer differ from its base
            self.lora_magnitude_vector = nn.Parameter(dora.weight_norm(self))

    def _apply(self, fn, recurse=True):
        kept = self._buffers.get("dora_weight_sq")
        super()._apply(fn, recurse)
        new = self._buffers.get("dora_weight_sq")
        if kept is not None and new.dtype != kept.dtype:   # (model.half() would overflow squares above 65504)
            self._buffers["dora_weight_sq"] = kept.to(new.device)
        return self

    @torch.no_grad()
    def init_adapters(self, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
        """Starts the adapters at (lora_A, lora_B) instead of (Kaiming, zero), remembering the start (on the
        CPU, in float32)."""
        if self.use_dora:
            raise ValueError("a DoRA layer starts at B = 0 (its magnitude at the base's row norms)")
        self.lora_A.copy_(lora_A)
        self.lora_B.copy_(lora_B)
        self.lora_A_init = self.lora_A.detach().to("cpu", torch.float32, copy=True)
        self.lora_B_init = self.lora_B.detach().to("cpu", torch.float32, copy=True)

    def adapter_parameters(self) -> list:
        """What trains: lora_A, lora_B (and DoRA's magnitudes)."""
        return [self.lora_A, self.lora_B] + ([self.lora_magnitude_vector] if self.use_dora else [])

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    # weight and bias describe the base's, as PEFT's LoRA layers forward their base layer's: model code that reads
    # `self.o_proj.weight.dtype` to cast its input (several transformers models do, in forward) runs, and tools
    # probing a layer's dtype, device or shape find them. Not the dense tensor itself: model code computing with
    # `layer.weight` directly (Mamba's dt_proj) would skip the adapter, so that is an error (BaseWeight). A 4-bit
    # base's weight is its QuantState (the dense weight's dtype, device, shape). Not parameters of this module (its
    # state_dict has them under base.).
    @property
    def weight(self):
        return self.base.weight if isinstance(self.base, Linear4bit) else BaseWeight(self.base.weight)

    @property
    def bias(self):
        return self.base.bias

    def __setattr__(self, name, value):
        if name in ("weight", "bias") and "base" in self.__dict__.get("_modules", {}):
            # (transformers' tie_weights sets lm_head.weight = the embedding's: a dense base takes it)
            if isinstance(self.base, Linear4bit):
                raise AttributeError(f"cannot set the {name} of a LoRA layer on a 4-bit base (tied to an embedding, "
                                     "or resized?): change the model before prepare_model, or merge it first")
            return setattr(self.base, name, value)
        super().__setattr__(name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_dora:
            return dora.dora_forward(self, x)
        base = self.base
        if isinstance(base, Linear4bit) and base.compute_dtype in (None, x.dtype) and isinstance(
                self.dropout, (Dropout, nn.Identity)):
            # One op for base and adapter (qlora_ext::lora_linear_4bit): one autograd node instead of five,
            # the same numbers. The seed is drawn exactly when Dropout would draw it.
            p = self.dropout.p if isinstance(self.dropout, Dropout) and self.dropout.training else 0.0
            return lora_linear_4bit(x, base.weight, self.lora_A, self.lora_B, self.scaling, p,
                                    draw_seed(x.device) if p > 0.0 else None,
                                    None if base.bias is None else base.bias.to(x.dtype))
        y = base(x)
        # the scaling applies to the rank-r intermediate, not the [..., out_features] product: r/out as many multiplies
        t = F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A) * self.scaling
        if y.dtype == t.dtype:  # add B's product into y inside the GEMM (no separate pass over y)
            return torch.addmm(y.reshape(-1, y.shape[-1]), t.reshape(-1, self.r), self.lora_B.t()).view(y.shape)
        return y + F.linear(t, self.lora_B).to(y.dtype)

    def extra_repr(self) -> str:
        return (f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}" + (", use_rslora=True" if self.use_rslora
                                                                                  else "") +
                (", use_dora=True" if self.use_dora else "") + (", LoftQ start" if self.lora_A_init is not None else ""))

    @torch.no_grad()
    def merged_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """base weight + scaling B @ A (with DoRA: its rows rescaled to the magnitude) as a dense [out_features,
        in_features] tensor, for export."""
        if self.use_dora:
            return dora.merged_weight(self, dtype)
        if isinstance(self.base, Linear4bit):
            w = self.base.dequantized_weight(torch.float32)
        else:
            w = self.base.weight.float()
        return (w + (self.lora_B.float() @ self.lora_A.float()) * self.scaling).to(dtype)


def _drop_refresh_hooks(base: nn.Module) -> None:
    hooks = base._load_state_dict_post_hooks   # (torch keeps them there; a handle would have to live somewhere)
    for key in [k for k, h in hooks.items() if isinstance(h, _RefreshDoraNorms)]:
        del hooks[key]


class _RefreshDoraNorms:
    """A load_state_dict post hook on a DoRA layer's 4-bit base: the base's weight may be another one now (a model
    built with placeholder weights, then loaded), so the layer takes its row norms again. It holds the layer
    weakly (base -> hook -> layer -> base would be a cycle that only the garbage collector frees: GPU memory
    kept after `del model`); a deepcopy of the layer gets a hook on its copy (the layer is in the deepcopy's
    memo before its base is copied), a copy of the base alone one that refreshes nothing; pickles keep the
    layer (pickle resolves the cycle)."""

    def __init__(self, layer: Optional["LoRALinear"]):
        self._layer = (lambda: None) if layer is None else weakref.ref(layer)

    def __call__(self, base: nn.Module, incompatible_keys) -> None:
        layer = self._layer()
        if layer is not None and layer.base is base and layer.dora_weight_sq is not None:
            layer.dora_weight_sq = dora.weight_row_norms_squared(base)

    def __deepcopy__(self, memo):
        layer = self._layer()
        return _RefreshDoraNorms(None if layer is None else memo.get(id(layer)))

    def __getstate__(self):
        return {"layer": self._layer()}

    def __setstate__(self, state):
        self.__init__(state["layer"])


def _refresh_dora_weight_sq(module: nn.Module, incompatible_keys, owner: Optional["LoRALinear"] = None) -> None:
    """The hook of DoRA layers pickled by earlier versions (torch.load finds it by this name): on the layer
    itself, or on its base naming the layer as owner."""
    layer = module if owner is None else owner
    if layer.dora_weight_sq is not None:
        layer.dora_weight_sq = dora.weight_row_norms_squared(layer.base)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every LoRALinear of model computes its base alone (PEFT's `with model.disable_adapter()`):
    the adapters' scaling is 0, so their product adds exactly zero, each module trained whole
    (modules_to_save) runs its original, and each embedding with trainable tokens its original rows; restored
    on the way out."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    saved = [m.scaling for m in layers]
    whole = [m for m in model.modules() if isinstance(m, (ModuleToSave, TrainableTokens))]
    enabled = [m.enabled for m in whole]
    try:
        for m in layers:
            m.scaling = 0.0
        for m in whole:   # modules_to_save: their originals
            m.enabled = False
        yield model
    finally:
        for m, scaling in zip(layers, saved):
            m.scaling = scaling
        for m, e in zip(whole, enabled):
            m.enabled = e


@torch.no_grad()
def merge_and_unload(model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Turns the model dense again, in place, for export (PEFT's merge_and_unload): each LoRALinear becomes an
    nn.Linear holding base + scaling B @ A (LoRALinear.merged_weight: the dequantized 4-bit base, so the dense
    model computes what the trained one did, not the original weights plus the adapter), each remaining
    Linear4bit or bitsandbytes 4-bit layer an nn.Linear holding its dequantized weight. dtype: the weights' dtype
    (default: each layer's original dtype); biases follow it. Everything comes out frozen, on the layer's device.
    A transformers model loaded quantized (bitsandbytes) forgets that, so save_pretrained writes a dense model.
    Each module trained whole (modules_to_save) becomes its trained copy, and each embedding with trainable
    tokens the embedding with their trained rows written in. Returns model (a bare LoRALinear or
    Linear4bit is returned as its replacement). Raises ValueError, before
    changing anything, if a bitsandbytes 8-bit layer would stay quantized."""
    def dense(module: nn.Module) -> Optional[nn.Linear]:
        if isinstance(module, LoRALinear):
            base = module.base
            base_dtype = base.weight_dtype if isinstance(base, Linear4bit) else base.weight.dtype
            return _frozen_linear(module.merged_weight(dtype or base_dtype), base.bias)
        if isinstance(module, Linear4bit):
            return _frozen_linear(module.dequantized_weight(dtype or module.weight_dtype), module.bias)
        if is_bnb_linear_4bit(module):
            weight = bnb_dense_weight(module)
            return _frozen_linear(weight.to(dtype or weight.dtype), module.bias)
        return None

    peft_layers = [n for n, m in model.named_modules()
                   if hasattr(m, "base_layer") and isinstance(getattr(m, "lora_A", None), nn.ModuleDict)]
    if peft_layers:
        raise ValueError(f"{peft_layers[0]} is a PEFT LoRA layer: merge a PEFT model with its own merge_and_unload() "
                         "(into 4 bits again), or exactly on the dense model: "
                         "PeftModel.from_pretrained(dense_model, adapter_folder).merge_and_unload()")
    eight_bit = [n for n, m in model.named_modules() if is_bnb_linear_8bit(m)]
    if eight_bit:
        raise ValueError(f"bitsandbytes 8-bit layers cannot be merged into a dense model here: {eight_bit[:5]}")
    top = dense(model)
    if top is not None:
        return top
    unwrap_trained(model)   # modules_to_save: their trained copies (and the config untied where that unties)
    unwrap_trainable_tokens(model)
    # LoRALinear first (its base goes with it), then the 4-bit layers left without an adapter
    for is_kind in (lambda m: isinstance(m, LoRALinear), lambda m: isinstance(m, Linear4bit), is_bnb_linear_4bit):
        for name, module in [(n, m) for n, m in model.named_modules() if is_kind(m)]:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, dense(module))
    forget_quantization(model)
    mark_quantized(model, False)
    return model


@dataclasses.dataclass
class ModelSummary:
    trainable_params: int
    total_params: int          # quantized weights count as their original number of elements
    model_bytes: int           # parameters + buffers as stored
    quantized_layers: int
    adapter_layers: int

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable_params:,} of {self.total_params:,} "
                f"({100 * self.trainable_params / max(self.total_params, 1):.3f}%); model {self.model_bytes / 2**20:.1f} "
                f"MiB; {self.quantized_layers} quantized linear layers, {self.adapter_layers} LoRA adapters")


def model_summary(model: nn.Module) -> ModelSummary:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    quantized = [m for m in model.modules() if isinstance(m, Linear4bit)]
    total += sum(m.in_features * m.out_features for m in quantized)
    nbytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    # bitsandbytes 4-bit layers not taken over: their packed weight is a parameter of numel/2 bytes, their
    # constants live outside parameters and buffers
    for m in model.modules():
        if is_quantized_bnb_linear_4bit(m):
            quantized.append(m)
            total += m.in_features * m.out_features - m.weight.numel()
            nbytes += bnb_state_bytes(m)
    adapters = sum(isinstance(m, LoRALinear) for m in model.modules())
    return ModelSummary(trainable, total, nbytes, len(quantized), adapters)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module whose names PEFT sees: without torch.compile's and (Distributed)DataParallel's wrappers."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model


def _unwrapped_names(model: nn.Module) -> dict:
    """Each module path of model -> its path in unwrap_model(model) (for a wrapper, without its prefix)."""
    inner = unwrap_model(model)
    prefix = next(n for n, m in model.named_modules() if m is inner)
    cut = len(prefix) + 1 if prefix else 0
    return {n: n[cut:] for n, _ in model.named_modules() if not prefix or n.startswith(prefix + ".")}


def lora_init_of(model: nn.Module) -> str:
    """How the model's adapters started: "loftq" if any started from LoftQ (LoRALinear.init_adapters), else
    "default"; what the trainer's --init-lora-weights records."""
    return "loftq" if any(isinstance(m, LoRALinear) and m.lora_A_init is not None for m in model.modules()) \
        else "default"


def chosen_linears(model: nn.Module, target_modules: Optional[Iterable[str]] = None,
                   exclude: Iterable[str] = ("lm_head",)) -> list:
    """The names of the layers prepare_model(model, target_modules, exclude=exclude) adapts (see there). Raises
    ValueError for a target that matches no linear layer."""
    linears = _linear_names(model)
    adapted = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    paths = _unwrapped_names(model)   # full names as PEFT writes them: without torch.compile's prefix
    exclude = set(exclude)
    if target_modules == "all-linear" or target_modules == ["all-linear"]:  # PEFT's spelling of the default
        target_modules = None
    if target_modules is None:
        return [n for n in linears if n.split(".")[-1] not in exclude and n not in exclude
                and paths.get(n) not in exclude]
    if isinstance(target_modules, str) and not re.fullmatch(r"[\w.\-]+", target_modules):
        return _regex_chosen(target_modules, linears, adapted, paths)
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    # a layer that already has an adapter is known (applying prepare_model again leaves it as it is)
    known = {n.split(".")[-1] for n in [*linears, *adapted]} | set(linears) | set(adapted) | {
        paths.get(n) for n in [*linears, *adapted]}
    unknown = [t for t in targets if t not in known]
    if unknown:
        raise ValueError(f"target_modules {unknown} match no nn.Linear in the model; its linear layers are "
                         f"named {sorted({n.split('.')[-1] for n in linears})}{_conv1d_note(model)}")
    return [n for n in linears if n in targets or paths.get(n) in targets or n.split(".")[-1] in targets]


def _regex_chosen(pattern: str, linears: dict, adapted: list, paths: dict) -> list:
    """The layers whose whole module path (as PEFT sees it) the regular expression matches: PEFT's meaning of a
    string target_modules (here a string that is not a plain name, e.g. r".*\\.(q|v)_proj"). One that matches
    layers adapted already (prepare_model again) only chooses nothing new."""
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"target_modules {pattern!r} is not a regular expression: {e}") from None
    chosen = [n for n in linears if regex.fullmatch(paths.get(n, n))]
    if not chosen and not any(regex.fullmatch(paths.get(n, n)) for n in adapted):
        some = sorted(paths.get(n, n) for n in linears)[:3]
        raise ValueError(f"target_modules {pattern!r} (a regular expression, matched against whole module paths "
                         f"as PEFT does) matches no nn.Linear; their paths are like {some}")
    return chosen


def _keep_4bit_bases_out_of_ddp_broadcasts(model: nn.Module) -> None:
    """DistributedDataParallel broadcasts every buffer from rank 0 before each training forward
    (broadcast_buffers=True, the default, also in transformers' Trainer): the 4-bit bases are buffers, frozen, so
    that would send the whole base model (3.9 GB for LLaMA-7B) every micro-batch. Names them in the model's
    list of what DDP leaves alone (torch's _set_params_and_buffers_to_ignore_for_model), keeping what was there.
    DDP then never sends them, at construction either: every rank must build the same base (the same checkpoint,
    or a random model from the same seed); the adapters and the other parameters are synchronised as usual."""
    bases = [f"{n}.{b}" for n, m in model.named_modules() if isinstance(m, Linear4bit)
             for b, _ in m.named_buffers(recurse=False)]
    if bases:
        kept = list(getattr(model, "_ddp_params_and_buffers_to_ignore", None) or [])
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, kept + [n for n in bases if n not in set(kept)])


def _conv1d_note(model: nn.Module) -> str:
    """For an error: the model's transformers Conv1D layers (GPT-2's c_attn, c_proj, c_fc: a linear layer
    storing its weight transposed), which prepare_model does not adapt."""
    names = sorted({n.split(".")[-1] for n, m in model.named_modules()
                    if type(m).__name__ == "Conv1D" and hasattr(m, "nf") and hasattr(m, "weight")})
    return (f"; {names} are transformers Conv1D layers (GPT-2's: the weight stored [in, out]), which qlora_ext "
            "does not adapt or quantize" if names else "")


def _linear_names(model: nn.Module) -> dict:
    """The layers prepare_model can adapt, by name: nn.Linear (bitsandbytes' layers included) and bare Linear4bit,
    but not the frozen base of an existing adapter (a second prepare_model must not wrap it in another adapter)
    nor a module trained whole (modules_to_save) or its original, nor an LM head tied to trainable tokens."""
    adapted = {name for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    whole = [name for name, m in model.named_modules() if isinstance(m, (ModuleToSave, TiedTokensHead))]
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, Linear4bit)) and name.rpartition(".")[0] not in adapted
            and not any(name.startswith(w + ".") for w in whole)}


def _frozen_linear(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Linear:
    """A frozen nn.Linear holding weight [out, in] and bias (cast to weight's dtype), on weight's device."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().to(weight.dtype).clone(), requires_grad=False)
    return linear


def _quantized_base(name: str, layer: nn.Module, quant_type: str, init_lora_weights: str,
                    compute_dtype: Optional[torch.dtype]):
    """(base, why kept dense) for a layer that is already quantized: a Linear4bit, taken as it is; a bitsandbytes
    4-bit layer, taken over exactly, or, where its format does not fit a Linear4bit, dequantized into a frozen
    dense layer (with the reason). (None, None) for a dense nn.Linear. Raises where the request
    cannot apply to the layer."""
    if is_bnb_linear_8bit(layer):
        raise ValueError(f"{name} is a bitsandbytes 8-bit layer (LLM.int8()), which qlora_ext cannot take over: "
                         "load the model in 16/32-bit (qlora_ext quantizes it) or with load_in_4bit")
    prequantized = isinstance(layer, Linear4bit) or is_bnb_linear_4bit(layer)
    if not prequantized:
        return None, None
    if quant_type == "none":
        raise ValueError(f"{name} is already 4-bit ({type(layer).__name__}): quant_type='none' (16-bit LoRA) needs "
                         "the model loaded with dense weights")
    if init_lora_weights == "loftq":
        raise ValueError(f"{name} is already 4-bit ({type(layer).__name__}): LoftQ needs the dense weights to "
                         "start from; load the model with dense weights")
    if isinstance(layer, Linear4bit):
        return layer, None
    try:
        problem = bnb_takeover_problem(layer)
        if problem is not None:
            return _frozen_linear(bnb_dense_weight(layer), layer.bias), problem
        return Linear4bit.from_bnb(layer, compute_dtype=compute_dtype), None
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from e


def prepare_model(model: nn.Module, target_modules: Optional[Iterable[str]] = None, r: int = 8,
                  alpha: float = 16.0, dropout: float = 0.0, quant_type: str = "nf4", double_quant: bool = True,
                  blocksize: int = 64, compute_dtype: Optional[torch.dtype] = None,
                  exclude: Iterable[str] = ("lm_head",), verbose: bool = False,
                  init_lora_weights: str = "default", loftq_iters: int = 1, loftq_svd: str = "exact",
                  use_rslora: bool = False, use_dora: bool = False, rank_pattern: Optional[Mapping[str, int]] = None,
                  alpha_pattern: Optional[Mapping[str, float]] = None,
                  modules_to_save: Optional[Iterable[str]] = None,
                  trainable_token_indices: Optional[Union[Sequence[int], Mapping[str, Sequence[int]]]] = None,
                  ) -> nn.Module:
    """Replaces matching nn.Linear layers of model (in place) with LoRALinear(Linear4bit(...)), or with
    LoRALinear(frozen nn.Linear) when quant_type is "none" (16-bit LoRA), and freezes everything else. Applied
    again, it adds adapters to the newly matching layers and leaves existing adapters (trainable) as they are.

    target_modules: names matched against the last component of each module's name (e.g. "q_proj"), or
    full dotted names; a string that is not a plain name is a regular expression matched against whole module
    paths, as PEFT's string target_modules (r".*\\.(q|v)_proj"); default (or PEFT's "all-linear"): every
    nn.Linear except those named in `exclude`. A
    chosen layer whose in_features is not a multiple of blocksize cannot be quantized (each weight row starts a
    block): it keeps its dense frozen weight and gets an adapter, with a warning naming it. init_lora_weights: "default"
    (A Kaiming-uniform, B zero: the model starts as the quantized base) or "loftq" (qlora_ext.loftq, with
    loftq_iters alternations: the adapters start at the rank-r approximation of each layer's quantization
    error, and the base is quantized from the weight less that; quantized layers only; loftq_svd "exact" or
    "randomized", see loftq_init). use_rslora: scale the adapters by alpha / sqrt(r) instead of alpha / r
    (rsLoRA, PEFT's use_rslora; lora_scaling). use_dora: DoRA layers (qlora_ext.dora; PEFT's use_dora), which
    start at the default init only. rank_pattern / alpha_pattern: another r / alpha for the layers whose module path
    a key selects, as PEFT's LoraConfig takes them (qlora_ext.lora_patterns: regular expressions matched against
    the path's end, the first matching key wins; {"q_proj": 64, "model.layers.0.mlp.down_proj": 4}); a key that
    selects none of the layers adapted here is warned about. modules_to_save: modules trained whole beside the
    adapters, PEFT's modules_to_save (module paths or their last components at a name boundary, e.g. ["lm_head",
    "embed_tokens"] or ["layers.0.mlp"]): each becomes a qlora_ext.modules_to_save.ModuleToSave, its original
    frozen and a copy trained (an exclude no longer applies to it). trainable_token_indices: rows of a token
    embedding trained on their own, PEFT's trainable_token_indices (a list of token ids: the input embedding's;
    or {embedding name: ids}): the embedding becomes a qlora_ext.trainable_tokens.TrainableTokens, and an LM
    head tied to it reads the same trained rows. Returns the model; model_summary(model) gives
    trainable/total parameters and bytes.

    Layers that are already 4-bit keep their format and values (quant_type, blocksize and double_quant apply
    to dense layers only): a bare Linear4bit becomes the base as it is; a bitsandbytes Linear4bit (a model
    loaded with transformers' BitsAndBytesConfig, or a pre-quantized checkpoint) is taken over exactly
    (Linear4bit.from_bnb: its codes, absmax decoded to float32, so the base computes bitsandbytes' weight).
    quant_type="none" and LoftQ need dense weights and refuse such layers; bitsandbytes' 8-bit layers are
    refused."""
    if quant_type not in ("nf4", "fp4", "int4", "none"):
        raise ValueError(f"quant_type must be 'nf4', 'fp4', 'int4' or 'none', got {quant_type!r}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
    check_adapter_settings(r, alpha, dropout)
    compute_dtype = checked_compute_dtype(compute_dtype)
    if init_lora_weights not in ("default", "loftq"):
        raise ValueError(f"init_lora_weights must be 'default' or 'loftq', got {init_lora_weights!r}")
    if loftq_svd not in LOFTQ_SVDS:
        raise ValueError(f"loftq_svd must be one of {LOFTQ_SVDS}, got {loftq_svd!r}")
    if init_lora_weights == "loftq" and use_dora:
        raise ValueError("init_lora_weights='loftq' cannot start DoRA layers (use_dora=True): DoRA starts at B = 0, "
                         "its magnitude at the base's row norms")
    if init_lora_weights == "loftq" and quant_type == "none":
        raise ValueError("init_lora_weights='loftq' needs a quantized base (quant_type nf4, fp4 or int4): a dense "
                         "base has no quantization error to start from, and A = B = 0 would never train")
    rank_pattern = lora_patterns.check_patterns(rank_pattern, "rank_pattern", integer=True)
    alpha_pattern = lora_patterns.check_patterns(alpha_pattern, "alpha_pattern", integer=False)
    linears = _linear_names(model)
    adapted = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    to_save = [modules_to_save] if isinstance(modules_to_save, str) else list(modules_to_save or [])
    chosen = chosen_linears(model, target_modules, exclude)
    both = [n for n in chosen if any(matches(".".join(n.split(".")[:i]), to_save)   # it, or a module it is in
                                     for i in range(1, n.count(".") + 2))]
    if both:
        raise ValueError(f"{both[0]} is both a LoRA target (target_modules) and in modules_to_save {to_save} (or "
                         "inside one): a module is either adapted or trained whole; leave it out of one of them")
    paths = _unwrapped_names(model)   # patterns match the paths PEFT sees (no torch.compile prefix)
    chosen_paths = [paths[n] for n in chosen]
    idle = [f"{what} keys {keys}" for what, keys in
            (("rank_pattern", lora_patterns.unmatched(rank_pattern, chosen_paths)),
             ("alpha_pattern", lora_patterns.unmatched(alpha_pattern, chosen_paths))) if keys]
    if idle:
        warnings.warn(f"{' and '.join(idle)} select none of the {len(chosen)} layer(s) adapted here (keys are "
                      "regular expressions matched against the end of a module path, e.g. 'q_proj' or "
                      "'model.layers.0.mlp.down_proj')", stacklevel=2)
    if not (chosen or adapted or to_save or trainable_token_indices is not None):
        raise ValueError("prepare_model: nothing to train: the model has no nn.Linear layer to adapt (besides "
                         f"exclude={sorted(set(exclude))}){_conv1d_note(model)}")
    bnb_before = holds_bnb_linear_4bit(model)
    # Layers that are already 4-bit, converted before anything changes (a refusal leaves the model as it was).
    prequantized = {n: _quantized_base(n, linears[n], quant_type, init_lora_weights, compute_dtype) for n in chosen}
    kept_dense = [f"{n} ({why}; dequantized)" for n, (_, why) in prequantized.items() if why is not None]
    # (checked before anything changes)
    tokens = None if trainable_token_indices is None else plan_trainable_tokens(model, trainable_token_indices,
                                                                                 matches, to_save)
    clash = tied_to(model, tokens or {}, {n: linears[n] for n in chosen})
    if clash:
        raise ValueError(f"{clash[0]} is tied to an embedding with trainable tokens (trainable_token_indices): its "
                         "LoRA adapter's base would not read the trained rows; leave it out of target_modules")
    head = None if not tokens else head_trained_whole_and_tied(model, tokens, lambda path: matches(path, to_save))
    if head is not None:
        warnings.warn(f"{head} is trained whole (modules_to_save) and tied to an embedding with trainable tokens: "
                      "its trained copy computes with its own rows here, but PEFT (0.21) cannot run this setup, so "
                      "its PEFT folder loads here only; train the head's rows through the tie (leave it out of "
                      "modules_to_save) for a folder PEFT runs", stacklevel=2)
    if to_save:   # (refuses, before anything changes, a name that selects nothing or an adapted module)
        wrap_modules_to_save(model, to_save, adapted)
    if tokens:
        wrap_trainable_tokens(model, tokens)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in adapted:  # adapters of an earlier prepare_model keep training
        for p in model.get_submodule(name).adapter_parameters():
            p.requires_grad_(True)
    for m in model.modules():   # and modules trained whole, and trainable tokens
        if isinstance(m, ModuleToSave):
            m.trained_module.requires_grad_(True)
        elif isinstance(m, TrainableTokens):
            m.trainable_tokens_delta.requires_grad_(True)
    mixed = sorted({(m.use_rslora, m.use_dora) for m in model.modules() if isinstance(m, LoRALinear)}
                   - {(bool(use_rslora), bool(use_dora))})
    if adapted and chosen and mixed:
        warnings.warn(f"the model's existing adapters have (use_rslora, use_dora) = {mixed}, the new ones "
                      f"{(bool(use_rslora), bool(use_dora))}: a mixed model (PEFT's format cannot hold it)",
                      stacklevel=2)
    for name in chosen:
        linear = linears[name]
        r_here = lora_patterns.value_for(rank_pattern, paths[name], r)
        alpha_here = lora_patterns.value_for(alpha_pattern, paths[name], alpha)
        if prequantized[name][0] is not None:
            base = prequantized[name][0]
        elif quant_type != "none" and linear.in_features % blocksize:
            # Each row of W must start a quant block: such a layer stays dense (frozen), with its adapter.
            kept_dense.append(f"{name} (in_features {linear.in_features} is not a multiple of blocksize {blocksize})")
            base = linear
        elif init_lora_weights == "loftq":
            q, lora_A, lora_B = loftq_init(linear.weight, r_here, lora_scaling(r_here, alpha_here, use_rslora),
                                           quant_type, blocksize, double_quant, loftq_iters, loftq_svd)
            base = Linear4bit.from_quantized(dataclasses.replace(q, dtype=linear.weight.dtype), linear.bias,
                                             compute_dtype)
        else:
            base = linear if quant_type == "none" else Linear4bit.from_linear(
                linear, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant,
                compute_dtype=compute_dtype)
        adapter = LoRALinear(base, r=r_here, alpha=alpha_here, dropout=dropout, use_rslora=use_rslora,
                             use_dora=use_dora)
        if isinstance(base, Linear4bit) and init_lora_weights == "loftq":
            adapter.init_adapters(lora_A, lora_B)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, adapter)
    if kept_dense:
        warnings.warn(f"{len(kept_dense)} linear layer(s) kept dense (frozen, with LoRA), not 4-bit: "
                      f"{', '.join(kept_dense[:5])}"
                      f"{' ...' if len(kept_dense) > 5 else ''}", stacklevel=2)
    _keep_4bit_bases_out_of_ddp_broadcasts(model)
    if bnb_before and not any(is_bnb_linear_4bit(m) or is_bnb_linear_8bit(m) for m in model.modules()):
        # every bitsandbytes layer taken over: to transformers this is no longer a bitsandbytes model (its Trainer
        # refuses to train "purely quantized" models it believes have no adapters, save_pretrained would write
        # bitsandbytes' quantization_config over qlora_ext's tensors)
        forget_quantization(model)
    if any(isinstance(m, Linear4bit) for m in model.modules()):
        mark_quantized(model, True)   # (as bitsandbytes' loads are: transformers' flash attention needs it)
    if verbose:
        print(model_summary(model))
    return model
