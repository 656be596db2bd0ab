"""A finished run's model rebuilt as the run built it (`qlora-train merge` and `generate`): the same weights loaded
in the dtype the run loaded them in, the same prepare_model settings, so the same 4-bit base bit for bit (CPU and
CUDA quantize identically; LoftQ's SVD does not, so a LoftQ run that trained on a GPU is rebuilt on one), and the
run's final adapters loaded. The base is quantized as the checkpoint is read (qlora_ext.load_4bit: no dense model in
memory) wherever that can be done and the run did not say --load-in-4bit off; it is the same base either way."""
from __future__ import annotations

import dataclasses
import json
import os
import re
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
    quantized_while_loading: bool  # the base was quantized as the checkpoint was read (qlora_ext.load_4bit)


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
    from .model import resolve_model_dir
    from .trainer import load_for_run, prepare_for_run, resolve_load_in_4bit

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
    if device not in ("cpu", "cuda") and not re.fullmatch(r"cuda:\d+", device):
        raise ConfigError(f"--device must be cpu or cuda[:N], got {device!r}")
    if loftq_from_gpu and not device.startswith("cuda"):
        raise ConfigError("this LoftQ run trained on a GPU: its base (quantized from the weight less LoftQ's float32 "
                          "SVD there) can only be rebuilt on a GPU")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA GPU is visible")
    load_dtype = torch.bfloat16 if run_device == "cuda" else torch.float32
    # The base quantized as the checkpoint is read where it can be (the same base, bit for bit, without the dense
    # model in memory: `generate` on a big run), unless the run said --load-in-4bit off.
    dev = torch.device(device)
    try:
        model_dir = resolve_model_dir(cfg.model, log)
    except ConfigError as e:   # (the user gave no --model here: say where it comes from)
        raise ConfigError(f"the run's model, as its {CONFIG_FILE} names it: {e} (a run saved before paths were "
                          "kept absolute names it relative to where it ran: run this from there)") from e
    model, tokenizer, model_dir, quantized_while_loading = load_for_run(
        cfg, model_dir, load_dtype, dev, resolve_load_in_4bit(cfg, dev, model_dir, auto_on_cpu=True), log,
        template_notes=False)
    prequantized = holds_bnb_linear_4bit(model)
    prepare_for_run(model, cfg, dev, tokenizer)
    load_adapters(model, adapter)
    model.eval()
    return RebuiltRun(model, tokenizer, cfg, model_dir, load_dtype, prequantized, quantized_while_loading)
