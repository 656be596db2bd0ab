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

from .hf_quantization import mark_quantized
from .nn import _QUANT_BUFFERS, Linear4bit, chosen_linears
from .quantize import quantize
from .save_4bit import (QUANT_METHOD, WEIGHTS_INDEX, WEIGHTS_PATTERN, is_4bit_checkpoint, quant_state_of,
                        quantized_layers, untie_word_embeddings)

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


def checkpoint_files(path: str) -> List[str]:
    """The weight files of the Hugging Face model directory `path`: safetensors (one file or an index's shards),
    else PyTorch .bin; a save_4bit checkpoint's own safetensors. Raises ValueError when it has none."""
    names = [("model.safetensors", SAFETENSORS_INDEX), ("pytorch_model.bin", BIN_INDEX)]
    if is_4bit_checkpoint(path):
        names = [(WEIGHTS_PATTERN.format(suffix=""), WEIGHTS_INDEX)]
    for single, index in names:
        if os.path.exists(os.path.join(path, single)):
            return [os.path.join(path, single)]
        if os.path.exists(os.path.join(path, index)):
            with open(os.path.join(path, index)) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(path, s) for s in shards]
    raise ValueError(f"{path!r} holds no {' or '.join(n for pair in names for n in pair)}: load_4bit reads Hugging "
                     "Face checkpoints in those formats")


def load_4bit_problem(path: str) -> Optional[str]:
    """Why load_4bit cannot read the model directory `path` (None if it can): a checkpoint quantized by another
    library, or no safetensors / .bin weights."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            quantization = json.load(f).get("quantization_config")
    except (OSError, ValueError) as e:
        return f"cannot read {path!r}/config.json: {e}"
    if quantization and quantization.get("quant_method") != QUANT_METHOD:
        return f"{path!r} is a quantized checkpoint ({quantization.get('quant_method', '?')}), read as it is"
    try:
        checkpoint_files(path)
    except ValueError as e:
        return str(e)
    return None


_SPAN_BYTES = 64 * 2**20    # how much of a safetensors shard one opening (one memory map) reads


def _safetensors_spans(file: str) -> List[List[str]]:
    """The tensor names of a safetensors file in file order, cut into runs of about _SPAN_BYTES (a tensor larger
    than that is a run of its own), from the file's header (8 bytes of little-endian length, then JSON with each
    tensor's data_offsets)."""
    with open(file, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    entries = sorted(((v["data_offsets"], k) for k, v in header.items() if k != "__metadata__"))
    spans, span, start = [], [], 0
    for (begin, end), key in entries:
        if span and end - start > _SPAN_BYTES:
            spans.append(span)
            span = []
        if not span:
            start = begin
        span.append(key)
    return spans + ([span] if span else [])


def _tensors(files: Iterable[str]) -> Iterator[Tuple[str, torch.Tensor]]:
    """(name, CPU tensor) for every tensor of the files, one at a time (safetensors memory-mapped, the file opened
    again for every run of about 64 MB, so that the pages read stay resident only while those tensors are used,
    and a shard of many small tensors, a 4-bit one, is not opened once per tensor; a .bin shard memory-mapped by
    torch.load)."""
    for file in files:
        if file.endswith(".safetensors"):
            from safetensors import safe_open
            for span in _safetensors_spans(file):
                with safe_open(file, framework="pt", device="cpu") as st:
                    for key in span:
                        yield key, st.get_tensor(key)
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


def _tied_weights(model: nn.Module) -> set:
    """The names of the parameters that share their tensor with another one, or will once transformers ties
    them (a skeleton built under init_empty_weights is not tied yet: its all_tied_weights_keys says what
    tie_weights will tie)."""
    names_of: Dict[int, List[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
    tied = {n for names in names_of.values() if len(names) > 1 for n in names}
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        tied |= {target, source}
    return tied


def _skeleton(config, dtype: torch.dtype, saved_layers: Optional[Dict[str, dict]], path: str) -> nn.Module:
    """The model of `config` on the meta device (buffers such as rotary frequencies computed for real). For a
    save_4bit checkpoint: its 4-bit layers must be linear layers of the model, and a 4-bit layer that the config
    ties to another weight (an lm_head sharing the embedding) is untied, since it has a weight of its own."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    for attempt in range(2):
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        if not saved_layers:
            return model
        not_linear = [n for n in saved_layers if not isinstance(_module_or_none(model, n), nn.Linear)]
        if not_linear:
            raise ValueError(f"{path!r}: the checkpoint's 4-bit layers {not_linear[:3]} are not linear layers of "
                             f"{type(model).__name__}")
        tied_weights = _tied_weights(model)
        tied = [n for n in saved_layers if f"{n}.weight" in tied_weights]
        if not tied:
            return model
        if attempt == 0:
            untie_word_embeddings(config)
    raise ValueError(f"{path!r}: the 4-bit layers {tied[:3]} share their weight with another layer in "
                     f"{type(model).__name__}, and untying the word embeddings does not separate them")


def _module_or_none(model: nn.Module, name: str) -> Optional[nn.Module]:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def load_4bit(path: str, target_modules: Optional[Iterable[str]] = None, quant_type: str = "nf4",
              double_quant: bool = True, blocksize: int = 64, dtype: Optional[torch.dtype] = None,
              device="cpu", compute_dtype: Optional[torch.dtype] = None,
              exclude: Iterable[str] = ("lm_head",)) -> nn.Module:
    """The causal LM in the Hugging Face directory `path`, on `device`, in eval mode: the linear layers that
    prepare_model(model, target_modules, exclude=exclude) would adapt are Linear4bit (quant_type, blocksize,
    double_quant; weight_dtype `dtype`; compute_dtype as prepare_model's), quantized from the checkpoint's weights
    cast to `dtype` on `device`; everything else is loaded in `dtype` (floating tensors; default bfloat16).
    A chosen layer whose in_features is not a multiple of blocksize, or whose weight is tied to another parameter,
    is loaded dense (prepare_model then treats it as after from_pretrained). Tensors that are not the model's are
    skipped with a warning, as from_pretrained skips them; a checkpoint of the bare base model (without the
    model's base_model_prefix) is read as from_pretrained reads it.
    A 4-bit checkpoint written by save_4bit is read as it was saved: its 4-bit layers are rebuilt from their
    codes and constants with their saved weight_dtype (no requantization; target_modules, exclude, quant_type,
    double_quant and blocksize apply to dense checkpoints only), everything else as above, in the dtype it was
    saved in unless `dtype` says otherwise.
    Raises ValueError for a checkpoint quantized by another library, a model that keeps modules in float32 at
    `dtype`, a checkpoint that lacks some of the model's tensors (names transformers would map) or whose 4-bit
    tensors do not fit their layers, or a bad target."""
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoConfig, GenerationConfig

    if quant_type not in ("nf4", "fp4", "int4"):
        raise ValueError(f"quant_type must be 'nf4', 'fp4' or 'int4', got {quant_type!r}")
    device = torch.device(device)
    config = AutoConfig.from_pretrained(path)
    saved_layers = quantized_layers(config, path)   # None for a dense checkpoint
    if saved_layers is not None:
        del config.quantization_config   # the loaded model is a plain one holding Linear4bit layers
    if dtype is None:
        saved_dtype = getattr(config, "dtype", None) if saved_layers is not None else None
        dtype = getattr(torch, saved_dtype) if isinstance(saved_dtype, str) else saved_dtype or torch.bfloat16
    files = checkpoint_files(path)
    model = _skeleton(config, dtype, saved_layers, path)
    fp32_plan = _keep_in_fp32(model, dtype)
    if fp32_plan:
        raise ValueError(f"{type(model).__name__} keeps {sorted(fp32_plan)} in float32 when loaded in {dtype}, "
                         "which load_4bit does not reproduce: load it with from_pretrained and prepare_model")
    if saved_layers is not None:
        quantized = set(saved_layers)
    else:
        # A weight shared with another parameter (an lm_head tied to the embedding) is loaded as it is:
        # prepare_model quantizes a copy of it later, as it does after from_pretrained.
        tied = _tied_weights(model)
        quantized = {n for n in chosen_linears(model, target_modules, exclude)
                     if model.get_submodule(n).in_features % blocksize == 0 and f"{n}.weight" not in tied}
    shapes = {n: (model.get_submodule(n).out_features, model.get_submodule(n).in_features) for n in quantized}
    with_bias = {n for n in quantized if model.get_submodule(n).bias is not None}
    # persistent tensors: what from_pretrained reads from a checkpoint (a saved 4-bit layer's weight is its buffers)
    expected = set(model.state_dict().keys())
    if saved_layers is not None:
        expected -= {f"{n}.weight" for n in quantized}
    # a checkpoint of the bare base model (LlamaModel's "layers.0...." for LlamaForCausalLM's "model.layers.0....")
    prefix = f"{model.base_model_prefix}." if getattr(model, "base_model_prefix", "") else ""
    biases: Dict[str, torch.Tensor] = {}
    packed: Dict[str, Dict[str, torch.Tensor]] = {n: {} for n in quantized}
    unexpected = []
    for key, tensor in _tensors(files):
        module_name, _, tensor_name = key.rpartition(".")
        if prefix and key not in expected and module_name not in quantized and (
                prefix + key in expected or prefix + module_name in quantized):
            key = prefix + key
            module_name = prefix + module_name
        if saved_layers is not None and module_name in quantized and tensor_name in _QUANT_BUFFERS:
            # the packed data as saved (a copy on the CPU: a view would keep the memory-mapped shard resident)
            packed[module_name][tensor_name] = tensor.to(device, copy=True)
        elif key not in expected:  # skipped, as from_pretrained skips them (e.g. stale rotary inv_freq)
            unexpected.append(key)
        elif module_name in quantized and tensor_name == "weight":
            w = tensor.to(device=device, dtype=dtype)
            _set_module(model, module_name, Linear4bit.from_quantized(quantize(w, blocksize, quant_type, double_quant),
                                                                      None, compute_dtype))
            del w
        elif module_name in quantized and tensor_name == "bias":
            biases[module_name] = tensor.clone()   # (a view would keep its part of the shard mapped)
        else:
            if device.type == "cpu":  # a copy: a view would keep the whole memory-mapped shard resident
                tensor = tensor.clone()
            set_module_tensor_to_device(model, key, device, value=tensor,
                                        dtype=dtype if tensor.is_floating_point() else None)
    if saved_layers is not None:
        for name, fmt in saved_layers.items():
            q = quant_state_of(name, packed.pop(name), fmt, shapes[name])
            _set_module(model, name, Linear4bit.from_quantized(q, None, compute_dtype))
    lacking_bias = sorted(with_bias - set(biases))
    for module_name, bias in biases.items():
        if not bias.is_floating_point() or tuple(bias.shape) != (shapes[module_name][0],):
            raise ValueError(f"{module_name}.bias must be a floating tensor [{shapes[module_name][0]}] for the "
                             f"{list(shapes[module_name])} layer, got {bias.dtype} {list(bias.shape)}")
        layer = model.get_submodule(module_name)
        layer.bias = nn.Parameter(bias.to(device=device, dtype=dtype, copy=True), requires_grad=False)
    # Tied weights (an lm_head sharing the embedding) point at the loaded tensor again; as in from_pretrained, a
    # pair that the checkpoint holds twice with different values stays untied (transformers warns).
    not_loaded = {n for n, t in model.named_parameters(remove_duplicate=False) if t.is_meta}
    try:
        model.tie_weights(missing_keys=not_loaded, recompute_mapping=False)
    except TypeError:   # a transformers without symmetric tying
        model.tie_weights()
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    missing += [f"{n}.bias" for n in lacking_bias]
    if missing and any(k.rpartition(".")[2] in ("lora_A", "lora_B", "weight_codes") for k in unexpected):
        raise ValueError(f"{path!r} holds qlora_ext's own modules (4-bit layers or LoRA adapters, e.g. "
                         f"{unexpected[:2]}): save_pretrained of a model after load_4bit or prepare_model, which no "
                         "loader reads back; save the 4-bit base with qlora_ext.save_4bit and the adapters with "
                         "save_peft_adapter (a state dict of the same prepared model loads with load_state_dict)")
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
    # transformers' mark of a quantized model, which its flash-attention path reads. (Not model.is_quantized, which
    # would make its Trainer refuse the model without adapters as it refuses a bitsandbytes load: a PEFT model over
    # it (register_peft_layers) would then fail its check, which expects transformers' own quantizer.)
    mark_quantized(model, True)
    return model
