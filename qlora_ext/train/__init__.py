"""The LoRA trainer on a 4-bit base (`qlora-train`, `python -m qlora_ext.train`).

Files, one job each: config (flags and checks), model (loading, the embedded default), data (text to
packed token blocks), trainer (the loop), checkpoint (adapters and resumable state on disk), report
(JSON, Markdown, loss plot), study (the QLoRA paper's claims in miniature), merge (a finished run as one dense
model), cli (the command line).
Needs the `train` extra: transformers, accelerate, safetensors, gguf, tqdm, matplotlib.
"""
from .checkpoint import load_adapters, save_adapters
from .config import ConfigError, TrainConfig
from .trainer import Trainer, train

__all__ = ["ConfigError", "TrainConfig", "Trainer", "load_adapters", "save_adapters", "train"]
