"""qlora_ext: QLoRA built from the metal up as a PyTorch extension.

Blockwise NF4/FP4/INT4 quantization with FP8 double quantization (this module), as CPU and CUDA ops
registered under torch.ops.qlora_ext.
"""
from . import _ops  # noqa: F401  (registers the native ops and their fake implementations)
from ._C import build_info
from .quantize import QuantState, code_table, dequantize, quantize

__version__ = "0.1.0"
__all__ = ["QuantState", "build_info", "code_table", "dequantize", "quantize"]
