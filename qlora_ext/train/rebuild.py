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
    checkpoint: Optional[str] = None   # the checkpoint folder whose adapters were loaded (None: the final ones)


def run_device_type(output_dir: str) -> str:
    """"cuda" or "cpu": where the run trained, from its report."""
    try:
        with open(os.path.join(output_dir, "report.json")) as f:
            device = json.load(f)["device"]
    except (OSError, KeyError, ValueError) as e:
        raise ConfigError(f"{output_dir!r} has no readable report.json (has the run finished?): {e}") from e
    return "cuda" if device.startswith("cuda") else "cpu"


def _trained_on(output_dir: str, cfg: TrainConfig, checkpoint: Optional[str]) -> str:
    """"cuda" or "cpu", where the run trained (what it loaded the weights in follows): its report's, else (an
    interrupted run) its checkpoint's, else its --device where that names one."""
    from .checkpoint import saved_trainer_value
    if os.path.exists(os.path.join(output_dir, "report.json")) or checkpoint is None:
        return run_device_type(output_dir)
    device = saved_trainer_value(checkpoint, "device") or (cfg.device if cfg.device != "auto" else None)
    if device is None:
        raise ConfigError("the run stopped before its report, and neither its checkpoint (older than this version) "
                          "nor its --device auto says where it trained: resume it to its end first")
    return "cuda" if device.startswith("cuda") else "cpu"


CHECKPOINT_HELP = ("the adapters of a checkpoint instead of the finished run's: its step (50), folder name "
                   "(step-000050, latest) or path; a run that has not finished needs one")


def adapter_file(output_dir: str, checkpoint: Optional[str] = None) -> str:
    """The adapters to load: the finished run's, or with checkpoint (a step number, a checkpoint's folder name
    such as step-000050 or latest, or a folder) that checkpoint's, so an interrupted run can be evaluated,
    sampled or merged too."""
    from .checkpoint import ADAPTER_FILE, checkpoint_dir, checkpoint_steps, latest_checkpoint
    steps = checkpoint_steps(output_dir)
    have = f"its checkpoints: steps {', '.join(map(str, steps))}" if steps else "it has no checkpoint"
    if checkpoint is None:
        path = os.path.join(output_dir, ADAPTER_FILE)
        if not os.path.exists(path):
            raise ConfigError(f"{path!r} does not exist: the run has not finished (resume it first, or give "
                              f"--checkpoint; {have})")
        return path
    root = checkpoint_dir(output_dir)
    if checkpoint == "latest":
        folder = latest_checkpoint(output_dir) or os.path.join(root, "latest")
    elif checkpoint.isdigit():
        folder = checkpoint_dir(output_dir, int(checkpoint))
    else:
        folder = checkpoint if os.path.isdir(checkpoint) else os.path.join(root, checkpoint)
    path = os.path.join(folder, ADAPTER_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"--checkpoint {checkpoint}: no {ADAPTER_FILE} in {folder} ({have})")
    return path


def rebuild_run(output_dir: str, device: Optional[str] = None, log=print,
                checkpoint: Optional[str] = None) -> RebuiltRun:
    """The model of the finished run in output_dir on device ("cpu", or "cuda[:N]" where one is visible; default:
    the CPU, but the GPU for a LoftQ run that trained on one), with its final adapters, or a checkpoint's
    (adapter_file)."""
    from ..bnb_io import holds_bnb_linear_4bit
    from .checkpoint import CONFIG_FILE, load_adapters
    from .model import resolve_model_dir
    from .trainer import load_for_run, prepare_for_run, resolve_load_in_4bit

    try:
        with open(os.path.join(output_dir, CONFIG_FILE)) as f:
            cfg = TrainConfig.from_dict(json.load(f))
    except OSError as e:
        raise ConfigError(f"--output-dir {output_dir!r} holds no run ({CONFIG_FILE}: {e.strerror})") from e
    except (ValueError, TypeError) as e:   # (not JSON, or not a run's keys)
        raise ConfigError(f"--output-dir {output_dir!r}: its {CONFIG_FILE} is not a run's config ({e})") from e
    adapter = adapter_file(output_dir, checkpoint)
    run_device = _trained_on(output_dir, cfg, None if checkpoint is None else os.path.dirname(adapter))
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
    return RebuiltRun(model, tokenizer, cfg, model_dir, load_dtype, prequantized, quantized_while_loading,
                      None if checkpoint is None else os.path.dirname(adapter))
