"""qlora_ext: QLoRA built from the metal up as a PyTorch extension.

Blockwise NF4/FP4/INT4 quantization with FP8 double quantization, a 4-bit linear op with autograd,
LoRA modules and a paged AdamW optimizer, as CPU and CUDA ops registered under torch.ops.qlora_ext.
"""
from . import _ops  # noqa: F401  (registers the native ops and their fake implementations)
from ._C import build_info
from .cross_entropy import linear_cross_entropy
from .linear import fused_large_kernel, linear_4bit, linear_backend, lora_linear_4bit, set_linear_backend
from .load_4bit import load_4bit
from .nn import Linear4bit, LoRALinear, adapters_disabled, merge_and_unload, model_summary, prepare_model
from .optim import PagedAdamW, PagedAdamW8bit
from .peft_io import load_peft_adapter, save_peft_adapter
from .peft_layers import register_peft_layers
from .quantize import QuantState, code_table, dequantize, quantize
from .save_4bit import save_4bit
from .routing import auto_routing, set_auto_routing

__version__ = "0.1.0"
set_auto_routing()  # the measured routing of "auto" (qlora_ext/auto_routing.json, or QLORA_AUTO_ROUTING)
__all__ = ["Linear4bit", "LoRALinear", "PagedAdamW", "PagedAdamW8bit", "QuantState", "adapters_disabled",
           "auto_routing", "build_info", "code_table", "dequantize", "fused_large_kernel", "linear_4bit",
           "linear_backend", "linear_cross_entropy", "load_4bit", "load_peft_adapter", "lora_linear_4bit",
           "merge_and_unload", "model_summary", "prepare_model", "quantize", "register_peft_layers", "save_4bit",
           "save_peft_adapter", "set_auto_routing", "set_linear_backend"]
