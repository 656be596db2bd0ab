"""`qlora-train eval`: the eval loss and perplexity of a finished run's model (the 4-bit base with its trained
adapters, rebuilt as the run built it; --base: the base alone) on the run's own held-out blocks (the report's
last eval, computed again) or on other text or instruction files (--data: every block of them, packed as the run
packs its data unless --packing says otherwise). The loss is the mean over the predicted tokens that are trained
on, as the trainer's eval is."""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys

from .config import PACKINGS, ConfigError
from .flags import Parser
from .rebuild import CHECKPOINT_HELP


def main(argv=None) -> int:
    p = Parser(prog="qlora-train eval", description=__doc__)
    p.add_argument("--output-dir", required=True, help="the run's folder (as given to qlora-train)")
    p.add_argument("--data", nargs="+", default=None,
                   help=".txt / .jsonl / .json / .parquet / .arrow files or folders, every block of which is evaluated "
                        "(default: the run's held-out blocks of its own data)")
    p.add_argument("--seq-len", type=int, default=None, help="block length (default: the run's)")
    p.add_argument("--packing", choices=PACKINGS, default=None,
                   help="default: the run's (auto: bfd for instruction data)")
    p.add_argument("--max-tokens", type=int, default=0, help="with --data: its first N tokens only (0: all)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the run's")
    p.add_argument("--base", action="store_true", help="the base without the adapters (PEFT's disable_adapter)")
    p.add_argument("--device", default=None,
                   help="cpu or cuda[:N] (default: the CPU, or the GPU for a LoftQ run that trained on one)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a sentence")
    p.add_argument("--checkpoint", default=None, help=CHECKPOINT_HELP)
    args = p.parse_args(argv)
    if args.seq_len is not None and args.seq_len < 2:
        raise ConfigError(f"--seq-len must be at least 2 (a block's first token predicts the second), got "
                          f"{args.seq_len}")
    if args.batch_size is not None and args.batch_size <= 0:
        raise ConfigError(f"--batch-size must be positive, got {args.batch_size}")
    if args.max_tokens < 0:
        raise ConfigError(f"--max-tokens must be >= 0, got {args.max_tokens}")
    if args.max_tokens and args.data is None:
        raise ConfigError("--max-tokens applies to --data (the run's held-out blocks are what the run held out)")
    result = evaluate_run(args.output_dir, data=args.data, seq_len=args.seq_len, packing=args.packing,
                          max_tokens=args.max_tokens, batch_size=args.batch_size, base=args.base,
                          device=args.device, log=lambda s: print(s, file=sys.stderr), checkpoint=args.checkpoint)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['what']}: loss {result['loss']:.4f}, perplexity {result['ppl']:.2f} over "
              f"{result['predicted_tokens']:,} predicted tokens in {result['blocks']} blocks of {result['seq_len']} "
              f"({result['packing']} packing)")
    return 0


def evaluate_run(output_dir: str, data=None, seq_len=None, packing=None, max_tokens: int = 0, batch_size=None,
                 base: bool = False, device=None, log=lambda s: None, checkpoint=None) -> dict:
    """The numbers `qlora-train eval` prints (see the module's docstring), as a dict. Notes (a packing that falls
    back, what --base leaves out) go to log."""
    from ..nn import adapters_disabled
    from .data import IGNORE, blocks_for, find_text_files
    from .loss import vocab_size
    from .model import max_positions
    from .rebuild import rebuild_run
    from .trainer import evaluate, packing_for

    run = rebuild_run(output_dir, device, log=lambda s: None, checkpoint=checkpoint)
    cfg = run.cfg
    dev = next(run.model.parameters()).device
    seq_len = seq_len or cfg.seq_len
    limit = max_positions(run.model)
    if limit and seq_len > limit:
        raise ConfigError(f"--seq-len {seq_len} is longer than the model allows (max_position_embeddings = {limit})")
    if data is None:
        blocks, labels, positions, packed = _held_out(run, output_dir, seq_len, packing)
        what = "the run's held-out blocks"
    else:
        files = find_text_files(data)
        # no held-out split: every block (pack puts them all on the train side, in order)
        every = blocks_for(files, run.tokenizer, seq_len, 0,
                           packing_for(packing or cfg.packing, files, run.model, dev, log), cfg.add_bos, max_tokens,
                           vocab_size(run.model), cfg.num_proc)
        blocks, labels, positions, packed = every.train, every.train_labels, every.train_positions, every.packing
        what = f"{len(files)} file(s)"
    if base and (cfg.init_lora_weights != "default" or cfg.init_adapter):
        log("note: --base is the 4-bit base alone; the run's eval before training included the adapters' start "
            f"({'--init-adapter' if cfg.init_adapter else '--init-lora-weights ' + cfg.init_lora_weights})")
    with adapters_disabled(run.model) if base else contextlib.nullcontext():
        loss = evaluate(run.model, blocks, batch_size or cfg.batch_size, dev, labels, positions)
    predicted = blocks.shape[0] * (blocks.shape[1] - 1) if labels is None else int((labels[:, 1:] != IGNORE).sum())
    at = "" if run.checkpoint is None else f" at {os.path.basename(run.checkpoint)}"
    return {"what": ("base without adapters" if base else "run" + at) + f" on {what}", "loss": loss,
            "ppl": math.exp(loss), "predicted_tokens": predicted, "blocks": int(blocks.shape[0]), "seq_len": seq_len,
            "packing": packed, "base_only": base, "output_dir": output_dir}


def _held_out(run, output_dir: str, seq_len: int, packing):
    """(blocks, labels, positions, packing) of the run's held-out blocks, from the files and packing its report
    records (older reports: its config's), checked against the report's fingerprint of its blocks."""
    from .data import find_text_files, resolve_packing, run_blocks
    from .loss import vocab_size
    from .output_dir import own_paths

    cfg = run.cfg
    report = os.path.join(output_dir, "report.json")
    recorded = {}
    if os.path.exists(report):
        with open(report) as f:
            recorded = json.load(f).get("data", {})
    if run.checkpoint is not None:   # (an interrupted run has no report: its checkpoint knows the blocks)
        from .checkpoint import saved_trainer_value
        recorded.update({k: v for k, v in (("packing", saved_trainer_value(run.checkpoint, "packing")),
                                           ("fingerprint", saved_trainer_value(run.checkpoint, "data_fingerprint")))
                         if v is not None})
    files, eval_files = recorded.get("file_paths"), recorded.get("eval_file_paths")
    try:   # a report from before file_paths (or none): the config's --data, relative to where older runs ran
        files = find_text_files(cfg.data, skip=own_paths(output_dir)) if files is None else files
        if eval_files is None:
            eval_files = find_text_files(cfg.eval_data, "--eval-data", own_paths(output_dir)) if cfg.eval_data else []
    except ConfigError as e:
        raise ConfigError(f"{e} (the run's --data, as it was given where the run ran: evaluate from there, or "
                          "give --data)") from e
    run_packing = recorded.get("packing") or resolve_packing(cfg.packing, list(files) + list(eval_files))
    if seq_len != cfg.seq_len or packing not in (None, "auto", run_packing):
        raise ConfigError(f"the run's held-out blocks are those of its --seq-len {cfg.seq_len} and --packing "
                          f"{run_packing}: give --data to evaluate other blocks")
    missing = [f for f in list(files) + list(eval_files) if not os.path.isfile(f)]
    if missing:
        raise ConfigError(f"the run's data file {missing[0]} is gone ({len(missing)} missing): give --data to "
                          "evaluate other text")
    blocks = run_blocks(files, eval_files, run.tokenizer, cfg.seq_len, cfg.eval_blocks, run_packing, cfg.add_bos,
                        cfg.max_tokens, vocab_size(run.model), cfg.num_proc)
    if recorded.get("fingerprint") not in (None, blocks.fingerprint()):
        raise ConfigError("the run's data no longer packs into the blocks it trained and evaluated on (files "
                          "edited since): its held-out blocks cannot be rebuilt; give --data to evaluate the text as "
                          "it is now")
    return blocks.eval, blocks.eval_labels, blocks.eval_positions, blocks.packing
