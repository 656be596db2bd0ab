"""PEFT's LoRA on qlora_ext's 4-bit layers: `get_peft_model` (and TRL's `peft_config=`) on a model whose linear
layers are `Linear4bit` (from `load_4bit`, or a 4-bit checkpoint), through PEFT's custom-module dispatch.

    config = qlora_ext.register_peft_layers(LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    model = peft.get_peft_model(qlora_ext.load_4bit(path), config)

PEFT does not know Linear4bit (it is not an nn.Linear): a LoraConfig registered here maps it to `LoraLinear4bit`,
a PEFT LoRA layer whose base is the Linear4bit, computed by qlora_ext's 4-bit op, with PEFT's lora_A / lora_B
modules, adapters, saving and loading (a PeftModel.from_pretrained needs the registered config too, as PEFT's
custom modules do: `config=register_peft_layers(LoraConfig.from_pretrained(folder))`). Merging requantizes the
merged weight (dequantize, add the delta, quantize in the layer's format), as PEFT merges into bitsandbytes' 4-bit
layers. qlora_ext's own `prepare_model` is the faster path (one fused op per layer, DoRA, LoftQ); this one is for
PEFT-centred code. Not here: DoRA and lora_bias (refused), PEFT's "all-linear" (it looks for nn.Linear: name
the layers).
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, List, Optional

import torch
from torch import nn

from .nn import Linear4bit
from .quantize import quantize


def register_peft_layers(config):
    """Registers Linear4bit -> LoraLinear4bit with this peft.LoraConfig (PEFT's experimental custom-module API);
    returns the config."""
    if getattr(config, "use_dora", False):
        raise ValueError("register_peft_layers: PEFT's DoRA on qlora_ext's 4-bit layers is not supported; use "
                         "qlora_ext.prepare_model(..., use_dora=True)")
    if not hasattr(config, "_register_custom_module"):
        raise TypeError(f"register_peft_layers takes a peft.LoraConfig (PEFT >= 0.14), got {type(config).__name__}")
    config._register_custom_module({Linear4bit: _layer_class()})
    return config


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
                if config.use_dora:
                    raise ValueError("LoraLinear4bit does not support DoRA: use qlora_ext.prepare_model(..., "
                                     "use_dora=True)")
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
                """Adds the adapters' B A * scaling to the base weight and quantizes the sum again (the 4-bit
                rounding of W + delta: not exactly W + delta)."""
                for adapter in check_adapters_to_merge(self, adapter_names):
                    if adapter not in self.lora_A:
                        continue
                    weight = self.get_base_layer().dequantized_weight(torch.float32) + self.get_delta_weight(adapter)
                    if safe_merge and not torch.isfinite(weight).all():
                        raise ValueError(f"NaNs in the merged weight: the adapter {adapter} seems broken")
                    self.base_layer = self._requantized(weight)
                    self.merged_adapters.append(adapter)

            def unmerge(self) -> None:
                if not self.merged:
                    warnings.warn("Already unmerged. Nothing to do.")
                    return
                while self.merged_adapters:
                    adapter = self.merged_adapters.pop()
                    if adapter in self.lora_A:
                        weight = self.get_base_layer().dequantized_weight(torch.float32) - \
                            self.get_delta_weight(adapter)
                        self.base_layer = self._requantized(weight)

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
