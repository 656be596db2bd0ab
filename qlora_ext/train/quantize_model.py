"""`qlora-train quantize`: a Hugging Face model directory turned into a 4-bit one, once, so that runs read a quarter
of the bytes and quantize nothing.

The model is read one tensor at a time with its chosen linear layers quantized as they arrive (qlora_ext.load_4bit:
the dense model is never held), then written with qlora_ext.save_4bit (config, safetensors shards, generation
config, tokenizer) under a temporary name and renamed. `qlora-train --model NEW_DIR` trains on it: the 4-bit
layers are read as they were saved, and a run on it computes what a run that quantizes the dense checkpoint with
the same settings and load dtype computes, bit for bit.
"""
from __future__ import annotations

import os
import time

import torch

from .config import DEFAULT_MODEL, ConfigError
from .flags import BoolFlag, Parser

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def quantize_model(model: str, target: str, quant_type: str = "nf4", double_quant: bool = True, blocksize: int = 64,
                   target_modules=None, dtype: torch.dtype | None = None, device: str = "cpu", max_shard_size="5GB",
                   log=print) -> str:
    """Writes `model` (a Hugging Face model directory, or "smollm2" for the embedded default) to the new folder
    target with its linear layers 4-bit (those prepare_model would adapt; quant_type, double_quant, blocksize),
    the weights cast to dtype before quantizing and the other tensors kept in it (default: float32 on the CPU,
    bfloat16 on a GPU: the dtype the trainer loads a model in there). Returns target."""
    from ..load_4bit import is_4bit_checkpoint, load_4bit
    from ..nn import Linear4bit
    from ..save_4bit import save_4bit
    from .model import load_tokenizer, resolve_model_dir
    from .output_dir import check_writable

    if os.path.exists(target) and (not os.path.isdir(target) or os.listdir(target)):
        raise ConfigError(f"--to {target!r} exists and is not an empty folder: the 4-bit model needs a new one")
    check_writable(target, "--to")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA GPU is visible")
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    path = resolve_model_dir(model, log)
    if is_4bit_checkpoint(path):
        raise ConfigError(f"--model {path!r} is already a 4-bit checkpoint (its layers would keep their format): "
                          "quantize the dense model it came from")
    tokenizer = load_tokenizer(path)
    t0 = time.perf_counter()
    try:
        net = load_4bit(path, target_modules=target_modules, quant_type=quant_type, double_quant=double_quant,
                        blocksize=blocksize, dtype=dtype, device=dev)
        if not any(isinstance(m, Linear4bit) for m in net.modules()):
            raise ConfigError(f"no layer of {type(net).__name__} was quantized: the chosen layers are not nn.Linear "
                              f"(GPT-2's Conv1D is not) or their in_features are not multiples of {blocksize}")
        save_4bit(net, target, tokenizer=tokenizer, max_shard_size=max_shard_size)
    except ValueError as e:   # a checkpoint load_4bit cannot read, a target that matches nothing, ...
        raise ConfigError(str(e)) from e
    except OSError as e:   # (save_4bit writes through a temporary folder: nothing half-written is left)
        raise ConfigError(f"cannot write the 4-bit model to {target!r}: {e}") from e
    nbytes = sum(os.path.getsize(os.path.join(target, f)) for f in os.listdir(target) if f.endswith(".safetensors"))
    log(f"4-bit model: {target} ({nbytes / 2**20:.1f} MiB of tensors, {quant_type}, double quant {double_quant}, "
        f"blocksize {blocksize}; {time.perf_counter() - t0:.0f} s)")
    return target


def main(argv=None) -> int:
    p = Parser(prog="qlora-train quantize", description=__doc__)
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"a Hugging Face model directory, or {DEFAULT_MODEL!r} for the embedded default")
    p.add_argument("--to", required=True, help="a new folder for the 4-bit model")
    p.add_argument("--quant-type", choices=("nf4", "fp4", "int4"), default="nf4", help="the 4-bit code (default: nf4)")
    p.add_argument("--double-quant", action=BoolFlag, default=True,
                   help="FP8 absmax constants: 4.127 instead of 4.5 bits/param (default: true)")
    p.add_argument("--blocksize", type=int, choices=(64, 128, 256), default=64,
                   help="weights per absmax (default: 64)")
    p.add_argument("--target-modules", default=None,
                   help="comma-separated layer names (default: every linear layer except lm_head)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="the dtype the weights are read in (default: float32 on the CPU, bfloat16 on a GPU)")
    p.add_argument("--device", default="cpu", help="where to quantize: cpu or cuda[:N] (default: cpu)")
    p.add_argument("--max-shard-size", default="5GB", help="the largest safetensors shard (default: 5GB)")
    args = p.parse_args(argv)
    targets = [t.strip() for t in args.target_modules.split(",") if t.strip()] if args.target_modules else None
    quantize_model(args.model, args.to, args.quant_type, args.double_quant, args.blocksize, targets,
                   DTYPES[args.dtype] if args.dtype else None, args.device, args.max_shard_size)
    return 0
