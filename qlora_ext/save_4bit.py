"""A 4-bit model saved as a Hugging Face model directory, and the format's description that load_4bit reads back.

Quantizing is done once: `save_4bit(model, path)` writes the frozen base of a model whose linear layers are
Linear4bit (after load_4bit or prepare_model) as config.json, safetensors shards of the packed buffers and the
other tensors, the generation config and, if given, the tokenizer. The config's quantization_config says which
layers are 4-bit and in which format ({"quant_method": "qlora_ext", "format_version": 1, "layers": {name:
{"quant_type", "blocksize", "double_quant", "weight_dtype"}}, "source": the dense model's folder}), so
`load_4bit(path)` rebuilds exactly those layers from their codes and constants: no dense weight is read or held,
and the 4-bit values are the saved ones, to the bit. The
checkpoint holds a quarter of a 16-bit model's bytes (LLaMA-65B: 35 GB instead of 130 GB).

LoRA adapters are not part of the base: LoRALinear layers are saved as their bases under the layer's own name,
their adapters left out (save them with save_peft_adapter or the trainer's adapter file).
transformers' from_pretrained cannot read it (it finds no weights file it knows and refuses); load_4bit reads it.
"""
from __future__ import annotations

import copy
import json
import os
import warnings
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from ._files import atomic_write_folder
from ._ops import BLOCKSIZES, QUANT_TYPES
from .bnb_io import is_bnb_linear_4bit, is_bnb_linear_8bit
from .modules_to_save import ModuleToSave
from .trainable_tokens import TiedTokensHead, TrainableTokens
from .nn import DENSE_WEIGHT_DTYPES, FORMAT_KEY, Linear4bit, LoRALinear
from .quantize import QuantState

QUANT_METHOD = "qlora_ext"
FORMAT_VERSION = 1
# Not model.safetensors: transformers skips a quant_method it does not know (with a warning) and would fill the
# 4-bit layers with random weights; without the file it knows, it refuses the folder instead.
WEIGHTS_PATTERN = "qlora_ext_4bit{suffix}.safetensors"
WEIGHTS_INDEX = "qlora_ext_4bit.safetensors.index.json"
_LAYER_KEYS = ("quant_type", "blocksize", "double_quant", "weight_dtype")
WEIGHT_DTYPES = {str(d).removeprefix("torch."): d for d in DENSE_WEIGHT_DTYPES}


def _base_tensors(model: nn.Module) -> Tuple[Dict[str, torch.Tensor], Dict[str, dict]]:
    """(the base model's tensors by checkpoint name, the 4-bit layers' formats by layer name): every LoRALinear
    stands for its base under its own name, without its adapters, every module trained whole (modules_to_save)
    for its frozen original, and every embedding with trainable tokens (and a head tied to it) for its base."""
    adapters = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    wrappers = {n for n, m in model.named_modules() if isinstance(m, ModuleToSave)}
    token_wrappers = {n for n, m in model.named_modules() if isinstance(m, (TrainableTokens, TiedTokensHead))}
    problems = [n for n, m in model.named_modules() if is_bnb_linear_4bit(m) or is_bnb_linear_8bit(m)]
    if problems:
        raise ValueError(f"{problems[:3]} are bitsandbytes layers, which this format does not hold: "
                         "prepare_model takes bitsandbytes 4-bit layers over as Linear4bit first")

    def saved_name(name: str) -> Optional[str]:
        """The checkpoint name of a tensor or module name (None for an adapter's own tensors)."""
        parts = name.split(".")
        for i in range(1, len(parts)):
            if ".".join(parts[:i]) in adapters:  # lora_A, lora_B (dropout holds no tensors) are left out
                return ".".join(parts[:i] + parts[i + 1:]) if parts[i] == "base" else None
            if ".".join(parts[:i]) in wrappers:  # the trained copy is left out
                return ".".join(parts[:i] + parts[i + 1:]) if parts[i] == "original_module" else None
            if ".".join(parts[:i]) in token_wrappers:  # the trained rows are left out
                return ".".join(parts[:i] + parts[i + 1:]) if parts[i] == "base_layer" else None
        return name

    layers = {}
    for name, m in model.named_modules():
        if isinstance(m, Linear4bit):
            layers[saved_name(name)] = {"quant_type": m.quant_type, "blocksize": m.blocksize,
                                        "double_quant": m.double_quant,
                                        "weight_dtype": str(m.weight_dtype).removeprefix("torch.")}
    tensors = {}
    formats = {f"{n}.{FORMAT_KEY}" if n else FORMAT_KEY for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    for key, t in model.state_dict().items():
        if key in formats:   # (the layers' formats are in the metadata)
            continue
        saved = saved_name(key)
        if saved is not None:
            tensors[saved] = t
    return tensors, layers


def embeddings_tied(model: nn.Module) -> bool:
    """Whether the model's output embedding (lm_head) shares the input embedding's weight."""
    try:
        output, inputs = model.get_output_embeddings(), model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return False
    output, inputs = (m.original_module if isinstance(m, ModuleToSave) else
                      m.base_layer if isinstance(m, (TrainableTokens, TiedTokensHead)) else
                      m.base if isinstance(m, LoRALinear) else m for m in (output, inputs))
    return output is not None and inputs is not None and getattr(output, "weight", None) is inputs.weight


def untie_word_embeddings(config) -> None:
    """Makes a transformers config (and its text config, for a composite model) say that the output embedding is
    not tied to the input embedding."""
    for c in {id(config): config, id(config.get_text_config()): config.get_text_config()}.values():
        if getattr(c, "tie_word_embeddings", False):
            c.tie_word_embeddings = False


def source_of(config) -> Optional[str]:
    """The dense model's folder a model came from (transformers' _name_or_path; through a save_4bit folder, the
    one it records), for PEFT adapters trained on it, whose base must be the dense model."""
    path = getattr(config, "_name_or_path", "") or None
    if path and is_4bit_checkpoint(path):
        return checkpoint_source(path)
    return os.path.abspath(path) if path and os.path.isdir(path) else path


def is_4bit_checkpoint(path: str) -> bool:
    """Whether the model directory `path` is a 4-bit checkpoint written by save_4bit (which only load_4bit reads)."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            quantization = json.load(f).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(quantization, dict) and quantization.get("quant_method") == QUANT_METHOD


def _loftq_warning(model: nn.Module) -> None:
    if any(isinstance(m, LoRALinear) and m.lora_A_init is not None for m in model.modules()):
        warnings.warn("the model's adapters started from LoftQ: its 4-bit bases were quantized from the weights "
                      "less LoftQ's starting adapters, so the saved base alone is not the original model",
                      stacklevel=3)


def save_4bit(model: nn.Module, path: str, tokenizer=None, max_shard_size: str | int = "5GB") -> str:
    """Writes the base of `model` (a transformers PreTrainedModel whose linear layers are qlora_ext Linear4bit,
    with or without LoRA adapters) to the new folder `path`, as a Hugging Face directory that load_4bit reads
    back without requantizing: config.json with a quantization_config naming the 4-bit layers, safetensors
    shards of at most max_shard_size (tensors shared by tied weights written once), generation_config.json and
    the tokenizer's files if `tokenizer` is given. Adapters are left out. The folder is filled under a temporary
    name and renamed, so `path` holds a whole checkpoint or nothing. Returns path. Raises ValueError for a model
    without a Hugging Face config or without 4-bit layers, bitsandbytes layers, or a `path` that exists and is
    not an empty folder."""
    from huggingface_hub import save_torch_state_dict

    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise ValueError(f"model must be a transformers PreTrainedModel (it needs a config to be loaded again), got "
                         f"{type(model).__name__}: save its state_dict instead (Linear4bit's buffers are plain "
                         "tensors)")
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise ValueError(f"path {path!r} exists and is not an empty folder: a checkpoint needs a new one")
    tensors, layers = _base_tensors(model)
    if not layers:
        raise ValueError("the model has no Linear4bit layers: save it with save_pretrained (load_4bit quantizes "
                         "a dense checkpoint as it reads it)")
    _loftq_warning(model)
    # tied weights share one tensor: written once, under the first name (the embedding's); load_4bit ties them
    seen, discard = {}, []
    for key, t in tensors.items():
        ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype, tuple(t.shape))
        if t.numel() and ident in seen:
            discard.append(key)
        seen.setdefault(ident, key)
    config = copy.deepcopy(config)
    config.quantization_config = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION,
                                  "layers": dict(sorted(layers.items())), "source": source_of(config)}
    if not embeddings_tied(model):
        untie_word_embeddings(config)   # an lm_head with a weight of its own: a loader must not tie it again
    floats = [t.dtype for t in tensors.values() if t.is_floating_point()]
    if floats:
        config.dtype = floats[0]

    def write(folder: str) -> None:
        config.save_pretrained(folder)
        generation = getattr(model, "generation_config", None)
        if generation is not None and getattr(model, "can_generate", lambda: False)():
            generation.save_pretrained(folder)
        save_torch_state_dict(tensors, folder, filename_pattern=WEIGHTS_PATTERN, max_shard_size=max_shard_size,
                              metadata={"format": "pt"}, shared_tensors_to_discard=discard)
        with open(os.path.join(folder, "README.md"), "w") as f:
            f.write(_CARD.format(layers=len(layers)))
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)

    atomic_write_folder(path, write)
    return path


_CARD = """# A 4-bit model written by qlora_ext.save_4bit

{layers} linear layers are stored 4-bit (packed codes and constants; see `quantization_config` in config.json), the
other tensors as they were. transformers' `from_pretrained` cannot read this format; load it with

```python
import qlora_ext
model = qlora_ext.load_4bit("path/to/this/folder", device="cuda")   # the dtypes it was saved in
```

or train on it with `qlora-train --model path/to/this/folder`.
"""


def quantized_layers(config, path: str) -> Optional[Dict[str, dict]]:
    """The 4-bit layers (name -> quant_type, blocksize, double_quant, weight_dtype) of a checkpoint whose config is
    `config` (a transformers config), if save_4bit wrote it; None for a dense checkpoint. Raises ValueError for
    another quantization method or a description this version cannot read."""
    spec = getattr(config, "quantization_config", None)
    if not spec:
        return None
    if not isinstance(spec, dict):
        spec = spec.to_dict() if hasattr(spec, "to_dict") else None
        if not isinstance(spec, dict):
            raise ValueError(f"{path!r}/config.json: quantization_config must be a mapping")
    method = spec.get("quant_method", "?")
    if method != QUANT_METHOD:
        raise ValueError(f"{path!r} is a quantized checkpoint ({method}): load it with from_pretrained, whose "
                         "quantizer reads it (prepare_model takes over bitsandbytes 4-bit layers exactly)")
    version = spec.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise ValueError(f"{path!r} is a qlora_ext checkpoint of format version {version!r}; this qlora_ext reads "
                         f"version {FORMAT_VERSION}")
    layers = spec.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise ValueError(f"{path!r}/config.json: quantization_config.layers must name the 4-bit layers")
    for name, fmt in layers.items():
        if (not isinstance(fmt, dict) or sorted(fmt) != sorted(_LAYER_KEYS) or fmt["quant_type"] not in QUANT_TYPES
                or type(fmt["blocksize"]) is not int or fmt["blocksize"] not in BLOCKSIZES
                or type(fmt["double_quant"]) is not bool or fmt["weight_dtype"] not in WEIGHT_DTYPES):
            raise ValueError(f"{path!r}/config.json: layer {name!r} must give exactly {list(_LAYER_KEYS)} (quant_type "
                             f"in {QUANT_TYPES}, blocksize an int in {BLOCKSIZES}, double_quant a bool, weight_dtype "
                             f"in {sorted(WEIGHT_DTYPES)}), got {fmt!r}")
    return layers


def checkpoint_spec(path: str) -> dict:
    """The quantization_config of the save_4bit checkpoint `path`, from its config.json (layers, source, ...)."""
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)["quantization_config"]


def checkpoint_source(path: str) -> Optional[str]:
    """The dense model's folder that the save_4bit checkpoint `path` was quantized from, as recorded (None if
    unknown)."""
    return checkpoint_spec(path).get("source")


def quant_state_of(name: str, parts: Dict[str, torch.Tensor], fmt: dict, shape: Tuple[int, int]) -> QuantState:
    """The QuantState of 4-bit layer `name` [out_features, in_features] = shape from its checkpoint tensors
    (`parts`: Linear4bit's buffer names -> tensors) in format `fmt` (its weight_dtype: the dtype dequantize
    returns, as saved), checked against the shape. Raises ValueError naming the tensor that is missing or does
    not fit."""
    out_features, in_features = shape
    blocksize, double_quant = fmt["blocksize"], fmt["double_quant"]
    if in_features % blocksize:
        raise ValueError(f"{name}: in_features {in_features} is not a multiple of the checkpoint's blocksize "
                         f"{blocksize}")
    nblocks = out_features * in_features // blocksize
    expected = {"weight_codes": (torch.uint8, (out_features * in_features + 1) // 2),
                "weight_absmax": (torch.uint8 if double_quant else torch.float32, nblocks)}
    if double_quant:
        expected["weight_absmax_scale"] = (torch.float32, (nblocks + 255) // 256)
        expected["weight_absmax_mean"] = (torch.float32, 1)
    for buffer, (want_dtype, want_numel) in expected.items():
        t = parts.get(buffer)
        if t is None:
            raise ValueError(f"the checkpoint lacks {name}.{buffer} of the 4-bit layer {name}")
        if t.dtype != want_dtype or t.dim() != 1 or t.numel() != want_numel:
            raise ValueError(f"{name}.{buffer} must be {want_dtype} [{want_numel}] for a [{out_features}, "
                             f"{in_features}] weight ({fmt}), got {t.dtype} {list(t.shape)}")
    extra = sorted(set(parts) - set(expected))
    if extra:
        raise ValueError(f"{name}: {extra} do not belong to a 4-bit layer with double_quant={double_quant}")
    return QuantState(parts["weight_codes"], parts["weight_absmax"], parts.get("weight_absmax_scale"),
                      parts.get("weight_absmax_mean"), torch.Size(shape), WEIGHT_DTYPES[fmt["weight_dtype"]], blocksize,
                      fmt["quant_type"])

