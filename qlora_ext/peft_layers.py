"""PEFT's LoRA on qlora_ext's 4-bit layers: `get_peft_model` (and TRL's `peft_config=`) on a model whose linear
layers are `Linear4bit` (from `load_4bit`, or a 4-bit checkpoint), through PEFT's custom-module dispatch.

    config = qlora_ext.register_peft_layers(LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    model = peft.get_peft_model(qlora_ext.load_4bit(path), config)

PEFT does not know Linear4bit (it is not an nn.Linear): a LoraConfig registered here maps it to `LoraLinear4bit`,
a PEFT LoRA layer whose base is the Linear4bit, computed by qlora_ext's 4-bit op, with PEFT's lora_A / lora_B
modules, adapters, saving and loading (a PeftModel.from_pretrained needs the registered config too, as PEFT's
custom modules do: `config=register_peft_layers(LoraConfig.from_pretrained(folder))`). Merging requantizes the
merged weight (dequantize, add the deltas, quantize once in the layer's format), with a warning, as PEFT merges
into bitsandbytes' 4-bit layers; unmerging puts back the base it kept, exactly. qlora_ext's own `prepare_model` is
the faster path (one fused op per layer, DoRA, LoftQ); this one is for PEFT-centred code. Refused: DoRA, lora_bias,
inits that read the dense weight, adapting prepare_model's layers; PEFT's "all-linear" finds nothing (it looks for
nn.Linear: name the layers).
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, List, Optional

import torch
from torch import nn

from .nn import Linear4bit, LoRALinear
from .quantize import quantize


MERGE_WARNING = ("merging LoRA into a qlora_ext 4-bit layer quantizes W + delta again: the merged model computes "
                 "the 4-bit rounding of the adapted one (a small adapter can largely vanish); unmerge restores the "
                 "base exactly. For an exact merge, merge on the dense model: "
                 "PeftModel.from_pretrained(dense_model, adapter_folder).merge_and_unload()")

# PEFT inits that read the base layer's dense weight (a Linear4bit's weight is its QuantState)
_DENSE_WEIGHT_INITS = ("pissa", "olora", "corda", "loftq", "mica")


def _check_config(config) -> None:
    if getattr(config, "use_dora", False):
        raise ValueError("register_peft_layers: PEFT's DoRA on qlora_ext's 4-bit layers is not supported; use "
                         "qlora_ext.prepare_model(..., use_dora=True)")
    if getattr(config, "lora_bias", False):
        raise ValueError("register_peft_layers: lora_bias on qlora_ext's 4-bit layers is not supported")
    init = getattr(config, "init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_DENSE_WEIGHT_INITS):
        raise ValueError(f"register_peft_layers: init_lora_weights={init!r} reads the dense base weight, which a "
                         "4-bit layer does not hold; qlora_ext.prepare_model(..., init_lora_weights='loftq') starts "
                         "from the quantization error (LoftQ)")


def register_peft_layers(config):
    """Registers Linear4bit -> LoraLinear4bit with this peft.LoraConfig (PEFT's experimental custom-module API),
    and makes a layer that already has qlora_ext's own adapter (prepare_model's LoRALinear) an error to target;
    returns the config."""
    if not hasattr(config, "_register_custom_module"):
        raise TypeError(f"register_peft_layers takes a peft.LoraConfig (PEFT >= 0.14), got {type(config).__name__}")
    _check_config(config)
    config._register_custom_module({Linear4bit: _layer_class(), LoRALinear: _AlreadyAdapted})
    return config


class _AlreadyAdapted(nn.Module):
    """What PEFT would build on prepare_model's LoRALinear: a refusal (one kind of adapter per model)."""

    def __init__(self, target, adapter_name, **kwargs):
        raise ValueError("PEFT was asked to adapt a layer that has qlora_ext's own LoRA adapter (prepare_model): "
                         "use one or the other on a model (PEFT would also freeze prepare_model's adapters and "
                         "leave them out of its saved folder)")


_LAYER_CLASS = None


def _layer_class():
    """LoraLinear4bit, defined on first use (peft is imported only when asked for)."""
    global _LAYER_CLASS
    if _LAYER_CLASS is None:
        from peft.tuners.lora.layer import LoraLayer
        from peft.tuners.tuners_utils import check_adapters_to_merge

        class LoraLinear4bit(nn.Module, LoraLayer):
            """PEFT's LoRA layer on a qlora_ext Linear4bit: base(x) + sum over active adapters of
            lora_B(lora_A(dropout(x))) * scaling, in the adapters' dtype, added in the output's."""

            def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0, lora_alpha: int = 1,
                         **kwargs) -> None:
                if config.lora_bias:
                    raise ValueError("LoraLinear4bit does not support lora_bias")
                _check_config(config)
                super().__init__()
                LoraLayer.__init__(self, base_layer)
                self.fan_in_fan_out = False
                self._active_adapter = adapter_name
                self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

            def _get_in_out_features(self, module: nn.Module):
                return module.in_features, module.out_features   # (PEFT would warn of an unknown layer type)

            def resolve_lora_variant(self, *, config, **kwargs):
                return None   # (plain LoRA only: DoRA refused above)

            def get_delta_weight(self, adapter: str) -> torch.Tensor:
                return (self.lora_B[adapter].weight.float() @ self.lora_A[adapter].weight.float()) * \
                    self.scaling[adapter]

            def _requantized(self, weight: torch.Tensor) -> Linear4bit:
                """A Linear4bit like the base (format, weight dtype, bias, compute dtype) holding `weight`."""
                base = self.get_base_layer()
                q = quantize(weight.to(base.weight_codes.device), base.blocksize, base.quant_type, base.double_quant)
                return Linear4bit.from_quantized(dataclasses.replace(q, dtype=base.weight_dtype), base.bias,
                                                 base.compute_dtype)

            def merge(self, safe_merge: bool = False, adapter_names: Optional[List[str]] = None) -> None:
                """Adds the adapters' B A * scaling (summed, then rounded once) to the base weight and quantizes
                the sum again in the base's format: the 4-bit rounding of W + delta, not W + delta (an adapter small
                beside W can largely vanish). The base before the first merge is kept (not in the state dict), so
                unmerge restores it exactly rather than rounding again."""
                names = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.lora_A]
                if not names:
                    return
                weight = self.get_base_layer().dequantized_weight(torch.float32)
                with torch.no_grad():
                    for a in names:
                        weight = weight + self.get_delta_weight(a)
                if safe_merge and not torch.isfinite(weight).all():
                    raise ValueError(f"NaNs in the merged weight: the adapters {names} seem broken")
                warnings.warn(MERGE_WARNING, stacklevel=2)
                if not self.merged:
                    self.__dict__["_unmerged_base"] = self.get_base_layer()   # (a plain attribute: not a submodule)
                self.base_layer = self._requantized(weight)
                self.merged_adapters.extend(names)

            def unmerge(self) -> None:
                """Puts back the base as it was before merging (exactly), for all merged adapters."""
                if not self.merged:
                    warnings.warn("Already unmerged. Nothing to do.")
                    return
                base = self.__dict__.pop("_unmerged_base")
                self.base_layer = base.to(self.get_base_layer().weight_codes.device)
                self.merged_adapters.clear()

            def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
                self._check_forward_args(x, *args, **kwargs)
                adapter_names = kwargs.pop("adapter_names", None)
                if self.disable_adapters:
                    if self.merged:
                        self.unmerge()
                    return self.base_layer(x, *args, **kwargs)
                if adapter_names is not None:
                    raise ValueError("LoraLinear4bit does not take adapter_names (mixed adapters in one batch)")
                result = self.base_layer(x, *args, **kwargs)
                if self.merged:
                    return result
                for adapter in self.active_adapters:
                    if adapter not in self.lora_A:
                        continue
                    lora_A, lora_B = self.lora_A[adapter], self.lora_B[adapter]
                    h = lora_B(lora_A(self.lora_dropout[adapter](x.to(lora_A.weight.dtype))))
                    result = result + (h * self.scaling[adapter]).to(result.dtype)
                return result

            def __repr__(self) -> str:
                return "lora." + super().__repr__()

        _LAYER_CLASS = LoraLinear4bit
    return _LAYER_CLASS
