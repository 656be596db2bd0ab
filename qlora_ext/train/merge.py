"""`qlora-train merge`: a finished run's model as one dense Hugging Face model directory, for serving or
converting (GGUF, vLLM) without qlora_ext.

The run's model is rebuilt as the run built it (rebuild.py: the same 4-bit base bit for bit, its adapters), then
merged into dense weights (qlora_ext.merge_and_unload): the dequantized base plus scaling B A (alpha / r, or
alpha / sqrt(r) with --use-rslora), i.e. what the trained model computed. The folder is written under a
temporary name and renamed.
"""
from __future__ import annotations

import json
import os

import torch

from .._files import atomic_write_folder
from ..load_4bit import is_4bit_checkpoint
from .config import ConfigError
from .flags import Parser
from .rebuild import CHECKPOINT_HELP

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def untie_if_adapted(model: torch.nn.Module) -> None:
    """An adapted lm_head tied to the input embedding is its own weight once merged: the config must say so, or a
    loader would tie them again."""
    config = getattr(model, "config", None)
    try:
        tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    except (AttributeError, NotImplementedError):
        return
    if config is not None and getattr(config, "tie_word_embeddings", False) and not tied:
        config.tie_word_embeddings = False


def stop_at_end_of_turn(model, tokenizer, log=print) -> None:
    """A run trained on its own --chat-template: the merged model's generation config also stops at the template's
    end-of-turn token (ChatML's <|im_end|> on a base model whose EOS is </s>), as TRL's setup_chat_format makes
    it, so transformers, vLLM and the like end a reply where the model learned to. Not where the mark is spelled
    out of several tokens (generation configs stop at tokens)."""
    from .generate import end_of_turn

    mark = end_of_turn(tokenizer)
    ids = tokenizer(mark, add_special_tokens=False).input_ids if mark else []
    if len(ids) != 1:
        return
    config = model.generation_config
    eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
    eos = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
    if ids[0] not in eos:
        config.eos_token_id = eos + ids
        log(f"merged model: generation also stops at {mark!r} (token {ids[0]}), the chat template's end of turn")


def merge_run(output_dir: str, target: str, dtype=None, log=print, checkpoint=None) -> str:
    """Writes the merged dense model of the run in output_dir (and its tokenizer) to the new folder target;
    returns target. dtype: the model's dtype (default: the dtype the run loaded the model in)."""
    from .. import merge_and_unload
    from .rebuild import rebuild_run

    if os.path.exists(target) and (not os.path.isdir(target) or os.listdir(target)):
        raise ConfigError(f"--to {target!r} exists and is not an empty folder: the merged model needs a new one")
    run = rebuild_run(output_dir, log=log, checkpoint=checkpoint)
    model, cfg, load_dtype = run.model, run.cfg, run.load_dtype
    merge_and_unload(model, dtype or load_dtype)   # also forgets a bitsandbytes load: the model is dense now
    model.to("cpu", dtype or load_dtype)  # embeddings and norms too: one dtype for the whole model
    model.config.dtype = dtype or load_dtype
    untie_if_adapted(model)
    if cfg.chat_template is not None:
        stop_at_end_of_turn(model, run.tokenizer, log)
    prequantized_note = "as bitsandbytes had quantized it (the checkpoint's own format)" if run.prequantized \
        else "as saved 4-bit by qlora_ext.save_4bit" if is_4bit_checkpoint(run.model_dir) \
        else f"as the run quantized it ({cfg.quant_type}, double quant {cfg.double_quant}, blocksize " \
        f"{cfg.blocksize})"

    at = "" if run.checkpoint is None else f" of {run.checkpoint}"

    def write(folder: str) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        run.tokenizer.save_pretrained(folder)
        with open(os.path.join(folder, "MERGED_FROM.txt"), "w") as f:
            f.write(f"Merged by qlora_ext from the run in {os.path.abspath(output_dir)}: the base {run.model_dir} "
                    f"{prequantized_note}, dequantized, plus its LoRA adapters{at} (r={cfg.r}, alpha={cfg.alpha}"
                    f"{', rsLoRA scaling alpha / sqrt(r)' if cfg.use_rslora else ''}"
                    f"{f', rank_pattern {json.dumps(cfg.rank_pattern)}' if cfg.rank_pattern else ''}"
                    f"{f', alpha_pattern {json.dumps(cfg.alpha_pattern)}' if cfg.alpha_pattern else ''}"
                    f"{', DoRA: each row rescaled to its trained magnitude' if cfg.use_dora else ''}).\n")

    try:
        atomic_write_folder(target, write)
    except OSError as e:
        raise ConfigError(f"cannot write the merged model to {target!r}: {e}") from e
    log(f"merged model: {target}")
    return target


def main(argv=None) -> int:
    p = Parser(prog="qlora-train merge", description=__doc__)
    p.add_argument("--output-dir", required=True, help="the run's folder (as given to qlora-train)")
    p.add_argument("--to", required=True, help="a new folder for the merged Hugging Face model")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="the merged model's dtype (default: the dtype the run loaded the model in: "
                        "float32 for a run on the CPU, bfloat16 on a GPU)")
    p.add_argument("--checkpoint", default=None, help=CHECKPOINT_HELP)
    args = p.parse_args(argv)
    merge_run(args.output_dir, args.to, DTYPES[args.dtype] if args.dtype else None, checkpoint=args.checkpoint)
    return 0
