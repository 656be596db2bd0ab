"""A finished run's model rebuilt as the run built it (`qlora-train merge` and `generate`): the same weights loaded
in the dtype the run loaded them in, the same prepare_model settings, so the same 4-bit base bit for bit (CPU and
CUDA quantize identically; LoftQ's SVD does not, so a LoftQ run that trained on a GPU is rebuilt on one), and the
run's final adapters loaded."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import torch

from .config import ConfigError, TrainConfig


@dataclasses.dataclass
class RebuiltRun:
    model: torch.nn.Module       # prepared, adapters loaded, in eval mode
    tokenizer: object
    cfg: TrainConfig
    model_dir: str               # where the base model came from
    load_dtype: torch.dtype      # what the run loaded the weights in: bf16 on a GPU, fp32 on the CPU
    prequantized: bool           # the base was loaded 4-bit by bitsandbytes (not quantized by the run)


def run_device_type(output_dir: str) -> str:
    """"cuda" or "cpu": where the run trained, from its report."""
    try:
        with open(os.path.join(output_dir, "report.json")) as f:
            device = json.load(f)["device"]
    except (OSError, KeyError, ValueError) as e:
        raise ConfigError(f"{output_dir!r} has no readable report.json (has the run finished?): {e}") from e
    return "cuda" if device.startswith("cuda") else "cpu"


def rebuild_run(output_dir: str, device: Optional[str] = None, log=print) -> RebuiltRun:
    """The model of the finished run in output_dir on device ("cpu", or "cuda[:N]" where one is visible; default:
    the CPU, but the GPU for a LoftQ run that trained on one)."""
    from ..bnb_io import holds_bnb_linear_4bit
    from .checkpoint import ADAPTER_FILE, CONFIG_FILE, load_adapters
    from .model import load_model_and_tokenizer
    from .trainer import prepare_for_run

    try:
        with open(os.path.join(output_dir, CONFIG_FILE)) as f:
            cfg = TrainConfig.from_dict(json.load(f))
    except OSError as e:
        raise ConfigError(f"--output-dir {output_dir!r} holds no run ({CONFIG_FILE}: {e.strerror})") from e
    adapter = os.path.join(output_dir, ADAPTER_FILE)
    if not os.path.exists(adapter):
        raise ConfigError(f"{adapter!r} does not exist: the run has not finished (resume it first)")
    run_device = run_device_type(output_dir)
    loftq_from_gpu = cfg.init_lora_weights == "loftq" and run_device == "cuda"
    device = device or ("cuda" if loftq_from_gpu else "cpu")
    if loftq_from_gpu and not device.startswith("cuda"):
        raise ConfigError("this LoftQ run trained on a GPU: its base (quantized from the weight less LoftQ's float32 "
                          "SVD there) can only be rebuilt on a GPU")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA GPU is visible")
    load_dtype = torch.bfloat16 if run_device == "cuda" else torch.float32
    model, tokenizer, model_dir = load_model_and_tokenizer(cfg.model, load_dtype, device, log)
    prequantized = holds_bnb_linear_4bit(model)
    prepare_for_run(model, cfg, torch.device(device))
    load_adapters(model, adapter)
    model.eval()
    return RebuiltRun(model, tokenizer, cfg, model_dir, load_dtype, prequantized)
