"""Loading a Hugging Face causal LM with its linear layers quantized while the checkpoint is read.

`AutoModelForCausalLM.from_pretrained` followed by `prepare_model` holds the whole dense model first (a 65B model
in bfloat16 is 130 GB): that is what QLoRA's memory figures leave out. `load_4bit` builds the model's skeleton on
the meta device (accelerate's init_empty_weights), then reads the checkpoint one tensor at a time: a chosen linear
layer's weight goes to the device in the load dtype, is quantized there by `qlora_ext.quantize` and dropped, and
every other tensor is put in place as it is. The peak is the 4-bit model plus one dense tensor. The result is the
model `from_pretrained` + `prepare_model` would build, bit for bit (the same quantize on the same values), with
bare Linear4bit layers where the adapters go: `prepare_model` then adds the adapters and keeps those bases.
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from torch import nn

from .nn import Linear4bit, chosen_linears
from .quantize import quantize

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


def checkpoint_files(path: str) -> List[str]:
    """The weight files of the Hugging Face model directory `path`: safetensors (one file or an index's shards),
    else PyTorch .bin. Raises ValueError when it has neither."""
    for single, index in (("model.safetensors", SAFETENSORS_INDEX), ("pytorch_model.bin", BIN_INDEX)):
        if os.path.exists(os.path.join(path, single)):
            return [os.path.join(path, single)]
        if os.path.exists(os.path.join(path, index)):
            with open(os.path.join(path, index)) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(path, s) for s in shards]
    raise ValueError(f"{path!r} holds no model.safetensors, pytorch_model.bin or their index: load_4bit reads "
                     "Hugging Face checkpoints in those formats")


def load_4bit_problem(path: str) -> Optional[str]:
    """Why load_4bit cannot read the model directory `path` (None if it can): a quantized checkpoint, or no
    safetensors / .bin weights."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            quantization = json.load(f).get("quantization_config")
    except (OSError, ValueError) as e:
        return f"cannot read {path!r}/config.json: {e}"
    if quantization:
        return f"{path!r} is a quantized checkpoint ({quantization.get('quant_method', '?')}), read as it is"
    try:
        checkpoint_files(path)
    except ValueError as e:
        return str(e)
    return None


def _tensors(files: Iterable[str]) -> Iterator[Tuple[str, torch.Tensor]]:
    """(name, CPU tensor) for every tensor of the files, one at a time (safetensors memory-mapped, the file opened
    again for each tensor, so that the pages read stay resident only while that tensor is used; a .bin shard
    memory-mapped by torch.load)."""
    for file in files:
        if file.endswith(".safetensors"):
            from safetensors import safe_open
            with safe_open(file, framework="pt", device="cpu") as st:
                keys = list(st.keys())
            for key in keys:
                with safe_open(file, framework="pt", device="cpu") as st:
                    tensor = st.get_tensor(key)
                yield key, tensor
        else:
            try:
                shard = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # torch's legacy (pre-zip) format cannot be memory-mapped
                shard = torch.load(file, map_location="cpu", weights_only=True)
            for key in list(shard):
                yield key, shard.pop(key)


def _keep_in_fp32(model: nn.Module, dtype: torch.dtype) -> set:
    """The module patterns from_pretrained would keep in float32 at `dtype` (transformers 5's rule: the model's
    _keep_in_fp32_modules for float16, _keep_in_fp32_modules_strict for float16 and bfloat16)."""
    plan = set()
    if dtype == torch.float16:
        plan |= set(getattr(model, "_keep_in_fp32_modules", None) or [])
    if dtype in (torch.float16, torch.bfloat16):
        plan |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    return plan


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def load_4bit(path: str, target_modules: Optional[Iterable[str]] = None, quant_type: str = "nf4",
              double_quant: bool = True, blocksize: int = 64, dtype: torch.dtype = torch.bfloat16,
              device="cpu", compute_dtype: Optional[torch.dtype] = None,
              exclude: Iterable[str] = ("lm_head",)) -> nn.Module:
    """The causal LM in the Hugging Face directory `path`, on `device`, in eval mode: the linear layers that
    prepare_model(model, target_modules, exclude=exclude) would adapt are Linear4bit (quant_type, blocksize,
    double_quant; weight_dtype `dtype`; compute_dtype as prepare_model's), quantized from the checkpoint's weights
    cast to `dtype` on `device`; everything else is loaded in `dtype` (floating tensors).
    A chosen layer whose in_features is not a multiple of blocksize, or whose weight is tied to another parameter,
    is loaded dense (prepare_model then treats it as after from_pretrained). Tensors that are not the model's are
    skipped with a warning, as from_pretrained skips them; a checkpoint of the bare base model (without the
    model's base_model_prefix) is read as from_pretrained reads it. Raises ValueError for a pre-quantized
    checkpoint, a model that keeps modules in float32 at `dtype`, a checkpoint that lacks some of the model's
    tensors (names transformers would map), or a bad target."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    if quant_type not in ("nf4", "fp4", "int4"):
        raise ValueError(f"quant_type must be 'nf4', 'fp4' or 'int4', got {quant_type!r}")
    device = torch.device(device)
    config = AutoConfig.from_pretrained(path)
    if getattr(config, "quantization_config", None):
        raise ValueError(f"{path!r} is a quantized checkpoint ({config.quantization_config.get('quant_method', '?')}"
                         "): load it with from_pretrained, whose quantizer reads it (prepare_model takes over "
                         "bitsandbytes 4-bit layers exactly)")
    files = checkpoint_files(path)
    with init_empty_weights():  # parameters on the meta device; buffers (rotary frequencies) computed for real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    fp32_plan = _keep_in_fp32(model, dtype)
    if fp32_plan:
        raise ValueError(f"{type(model).__name__} keeps {sorted(fp32_plan)} in float32 when loaded in {dtype}, "
                         "which load_4bit does not reproduce: load it with from_pretrained and prepare_model")
    # A weight shared with another parameter (an lm_head tied to the embedding) is loaded as it is: prepare_model
    # quantizes a copy of it later, as it does after from_pretrained.
    names_of = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
    quantized = {n for n in chosen_linears(model, target_modules, exclude)
                 if model.get_submodule(n).in_features % blocksize == 0
                 and len(names_of[id(model.get_submodule(n).weight)]) == 1}
    expected = set(model.state_dict().keys())  # persistent tensors: what from_pretrained reads from a checkpoint
    # a checkpoint of the bare base model (LlamaModel's "layers.0...." for LlamaForCausalLM's "model.layers.0....")
    prefix = f"{model.base_model_prefix}." if getattr(model, "base_model_prefix", "") else ""
    biases: Dict[str, torch.Tensor] = {}
    unexpected = []
    for key, tensor in _tensors(files):
        if key not in expected and prefix and prefix + key in expected:
            key = prefix + key
        module_name, _, tensor_name = key.rpartition(".")
        if key not in expected:  # skipped, as from_pretrained skips them (e.g. stale rotary inv_freq)
            unexpected.append(key)
        elif module_name in quantized and tensor_name == "weight":
            w = tensor.to(device=device, dtype=dtype)
            _set_module(model, module_name, Linear4bit.from_quantized(quantize(w, blocksize, quant_type, double_quant),
                                                                      None, compute_dtype))
            del w
        elif module_name in quantized and tensor_name == "bias":
            biases[module_name] = tensor
        else:
            if device.type == "cpu":  # a copy: a view would keep the whole memory-mapped shard resident
                tensor = tensor.clone()
            set_module_tensor_to_device(model, key, device, value=tensor,
                                        dtype=dtype if tensor.is_floating_point() else None)
    for module_name, bias in biases.items():
        layer = model.get_submodule(module_name)
        layer.bias = nn.Parameter(bias.to(device=device, dtype=dtype, copy=True), requires_grad=False)
    model.tie_weights()  # tied weights (an lm_head sharing the embedding) point at the loaded tensor again
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise ValueError(f"{path!r} lacks {len(missing)} tensor(s) of the model, e.g. {missing[:3]}" + (
            f", and holds {len(unexpected)} it does not have, e.g. {unexpected[:3]}: names transformers maps at "
            "load (renamed or fused weights, another prefix), which load_4bit does not" if unexpected else ""))
    if unexpected:
        warnings.warn(f"{len(unexpected)} tensor(s) of {path!r} are not the model's and were not loaded, e.g. "
                      f"{unexpected[:3]}", stacklevel=2)
    model.to(device)  # the buffers built on the CPU (parameters are there already)
    try:
        model.generation_config = GenerationConfig.from_pretrained(path)
    except OSError:  # no generation_config.json: from_config's default stays
        pass
    model.eval()
    return model
