"""Adapters and resumable checkpoints on disk, all written atomically (temporary name, then os.replace).

    <output_dir>/adapter.safetensors          the trained LoRA tensors (float32), run config in its metadata
    <output_dir>/config.json                  the run config (TrainConfig as JSON)
    <output_dir>/peft_adapter/                the same adapters in PEFT's format (qlora_ext.peft_io)
    <output_dir>/checkpoints/step-000050/     adapter.safetensors + trainer_state.pt (optimizer state_dict,
                                              RNG states, step and data position, loss history)
    <output_dir>/checkpoints/latest           the name of the newest complete checkpoint

The optimizer is saved through its state_dict only (torch.optim.AdamW's format, which PagedAdamW keeps), so a
checkpoint does not depend on which optimizer wrote it beyond that format.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from typing import Dict, List, Optional

import torch

from .._files import atomic_save_safetensors, atomic_write_text
from ..nn import LoRALinear, lora_init_of
from .config import ConfigError

ADAPTER_FILE = "adapter.safetensors"
STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "config.json"
CHECKPOINTS_DIR = "checkpoints"   # <output_dir>/checkpoints/step-NNNNNN/, `latest`, the best eval's adapters


def checkpoint_dir(output_dir: str, step: Optional[int] = None) -> str:
    """<output_dir>/checkpoints, or with step the folder of that step's checkpoint."""
    root = os.path.join(output_dir, CHECKPOINTS_DIR)
    return root if step is None else os.path.join(root, f"step-{step:06d}")


def adapter_state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The trainable tensors (the LoRA A and B matrices, DoRA's magnitudes, the copies of modules trained whole)
    by parameter name, detached, on the CPU."""
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}


VARIANTS = {"use_rslora": "--use-rslora", "use_dora": "--use-dora"}   # what the same tensors compute differently


def _variants(model: torch.nn.Module) -> dict:
    return {k: any(getattr(m, k, False) for m in model.modules()) for k in VARIANTS}


def _layer_alphas(model: torch.nn.Module) -> Dict[str, float]:
    """Each adapter's alpha by layer name: the tensors do not show it (with --alpha-pattern it differs by layer)."""
    return {n: float(m.alpha) for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def save_adapters(path: str, model: torch.nn.Module, config: dict) -> None:
    """The model's adapters (adapter_state) and the run config in the file's metadata, with the model's own
    use_rslora and use_dora and each layer's alpha (what the tensors belong to, whatever `config` says)."""
    config = dict(config, **_variants(model), layer_alphas=_layer_alphas(model))
    atomic_save_safetensors(adapter_state(model), path, metadata={"format": "qlora_ext-lora",
                                                                  "config": json.dumps(config)})


def read_adapter_config(path: str) -> dict:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return json.loads((f.metadata() or {}).get("config", "{}"))


def load_adapters(model: torch.nn.Module, path: str) -> None:
    """Copies the tensors of an adapter file into model's trainable parameters (same names and shapes as
    when it was saved: apply prepare_model with the same settings first)."""
    from safetensors.torch import load_file

    if not os.path.exists(path):
        raise ConfigError(f"adapter file {path!r} does not exist")
    # LoftQ's adapters belong to the base quantized from the weight less their start: they do not fit a base
    # quantized from the weight itself, nor the other way round (the file's run config says which it was)
    saved = read_adapter_config(path)
    saved_init = saved.get("init_lora_weights", "default")
    model_init = lora_init_of(model)
    if saved_init != model_init:
        raise ConfigError(f"adapter file {path!r} was trained with --init-lora-weights {saved_init}, the model is "
                          f"prepared with {model_init}: prepare it as the run did")
    for key, model_value in _variants(model).items():   # the same tensors, another layer: another model
        saved_value = bool(saved.get(key, False))
        if saved_value != model_value:
            raise ConfigError(f"adapter file {path!r} was trained with{'' if saved_value else 'out'} {VARIANTS[key]}, "
                              f"the model is prepared with{'' if model_value else 'out'} it: prepare it as the run did")
    saved_alphas = saved.get("layer_alphas")
    if saved_alphas is None and isinstance(saved.get("alpha"), (int, float)) and not saved.get("alpha_pattern"):
        saved_alphas = {n: float(saved["alpha"]) for n in _layer_alphas(model)}   # a file from before layer_alphas
    saved_alphas = saved_alphas or {}
    other = [f"{n} (file {saved_alphas[n]}, model {a})" for n, a in _layer_alphas(model).items()
             if n in saved_alphas and saved_alphas[n] != a]
    if other:
        raise ConfigError(f"adapter file {path!r} was trained with another alpha for {len(other)} layer(s): "
                          f"{', '.join(other[:3])}: prepare the model with the run's --alpha and --alpha-pattern")
    tensors = load_file(path)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ConfigError(f"adapter file {path!r} does not fit the model: {len(missing)} missing tensor(s) "
                          f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]} (were the same "
                          "target modules and --modules-to-save used?)")
    with torch.no_grad():
        for n, p in params.items():
            if tensors[n].shape != p.shape:
                raise ConfigError(f"adapter tensor {n}: shape {tuple(tensors[n].shape)} in the file, "
                                  f"{tuple(p.shape)} in the model (another rank: prepare the model with the run's "
                                  "--r and --rank-pattern)")
            p.copy_(tensors[n])


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(output_dir: str, step: int, model, optimizer, trainer_state: dict, config: dict,
                    keep: int = 0, extra_files: Optional[Dict[str, str]] = None) -> str:
    """Writes checkpoints/step-NNNNNN/ through a temporary folder, then points `latest` at it; with keep > 0,
    removes all but the newest `keep` checkpoints after that. A crash at any point leaves the previous
    checkpoint usable. extra_files: {name in the checkpoint: file to copy there} (the best eval's adapters)."""
    root = checkpoint_dir(output_dir)
    os.makedirs(root, exist_ok=True)
    name = os.path.basename(checkpoint_dir(output_dir, step))
    final, tmp = os.path.join(root, name), os.path.join(root, f".{name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_adapters(os.path.join(tmp, ADAPTER_FILE), model, config)
    state = dict(trainer_state, step=step, optimizer=optimizer.state_dict(), rng=rng_state())
    torch.save(state, os.path.join(tmp, STATE_FILE))
    atomic_write_text(os.path.join(tmp, CONFIG_FILE), json.dumps(config, indent=2) + "\n")
    for name_in, source in (extra_files or {}).items():
        shutil.copyfile(source, os.path.join(tmp, name_in))
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(os.path.join(root, "latest"), name + "\n")
    if keep > 0:   # (after `latest` moved on: the one it named before may go)
        steps = sorted((int(d.split("-")[1]), d) for d in os.listdir(root)
                       if d.startswith("step-") and d.split("-")[1].isdigit())
        for _, old in steps[:-keep]:
            if old != name:
                shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return final


def checkpoint_steps(output_dir: str) -> List[int]:
    """The steps of the complete checkpoints in output_dir, ascending."""
    root = checkpoint_dir(output_dir)
    names = os.listdir(root) if os.path.isdir(root) else []
    return sorted(int(d[5:]) for d in names if d.startswith("step-") and d[5:].isdigit()
                  and os.path.exists(os.path.join(root, d, STATE_FILE)))


def latest_checkpoint(output_dir: str) -> Optional[str]:
    """The checkpoint `latest` names, or where that one is gone (removed by hand), the newest complete one."""
    root = checkpoint_dir(output_dir)
    pointer = os.path.join(root, "latest")
    if os.path.exists(pointer):
        with open(pointer) as f:
            path = os.path.join(root, f.read().strip())
        if os.path.exists(os.path.join(path, STATE_FILE)):
            return path
    steps = checkpoint_steps(output_dir)
    return checkpoint_dir(output_dir, steps[-1]) if steps else None


def saved_trainer_value(path: str, key: str):
    """One value of a checkpoint folder's trainer state (None if it has none), without touching a model."""
    # mmap: the optimizer state in the same file is not read
    state = torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=True, mmap=True)
    return state.get(key)


def load_checkpoint(path: str, model, optimizer) -> dict:
    """Restores adapters, optimizer state and RNG states from a checkpoint folder; returns the trainer state
    (step, micro_step, history, ...)."""
    load_adapters(model, os.path.join(path, ADAPTER_FILE))
    state = torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state.pop("optimizer"))
    set_rng_state(state.pop("rng"))
    return state
