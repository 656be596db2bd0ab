"""`qlora-train` and `python -m qlora_ext.train`: train (the default), the demo, the paper-claims study, merge a
finished run into a dense model, generate text with it, evaluate it, or quantize a model to 4 bits once.

    qlora-train demo                                  # the quickstart: a few minutes on a 2-core CPU
    qlora-train --model DIR --data FILE_OR_DIR ...    # your model and text (see --help)
    qlora-train --output-dir runs/x --resume          # continue a run bit-exactly
    qlora-train study                                 # the QLoRA paper's claims, in miniature
    qlora-train merge --output-dir runs/x --to DIR    # the run's model as one dense Hugging Face model
    qlora-train generate --output-dir runs/x --prompt "..."   # text from the run's model
    qlora-train eval --output-dir runs/x [--data FILE]   # the run's eval loss (on its held-out blocks, or FILE)
    qlora-train quantize --model DIR --to DIR4        # a 4-bit copy of a model, to train on (--model DIR4)
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from .config import (DEMO_OVERRIDES, ConfigError, add_arguments, as_command_line, config_from_args,
                     resume_config, with_init_adapter_settings)
from .flags import Parser

COMMANDS = ("train", "demo", "study", "merge", "generate", "eval", "quantize")
DEMO_PROMPT = "KING.\nWhat news, my lord?"  # the trained model continues it in the demo's last lines


def _train_parser(prog: str, defaults=None, description=None) -> argparse.ArgumentParser:
    p = Parser(prog=prog, description=description or __doc__)
    add_arguments(p, defaults)
    return p


def _explicit_flags(parser: argparse.ArgumentParser, argv) -> dict:
    """The flags given on the command line (not their defaults)."""
    for a in parser._actions:
        a.default = argparse.SUPPRESS
    return vars(parser.parse_args(argv))


def run_train(argv, demo: bool) -> int:
    prog = "qlora-train demo" if demo else "qlora-train"
    defaults = DEMO_OVERRIDES if demo else None
    desc = ("The demo: LoRA on an NF4+DQ base of the embedded SmolLM2-135M-Instruct, on Shakespeare; "
            "under 10 minutes on a 2-core CPU. Every training flag can be changed." if demo else None)
    args = _train_parser(prog, defaults, desc).parse_args(argv)
    given = _explicit_flags(_train_parser(prog, defaults), argv)
    if "steps" in given and given.get("epochs"):
        raise ConfigError("give --steps or --epochs, not both (--epochs sets the steps)")
    if args.resume:
        cfg = resume_config(args.output_dir, given)
    else:
        cfg, taken = with_init_adapter_settings(config_from_args(args), given)
        if taken:
            print(f"--init-adapter: {as_command_line(cfg, taken)} from the folder")
    from .trainer import train

    t0 = time.perf_counter()
    try:
        r = train(cfg, sample_prompt=DEMO_PROMPT if demo else None)
    except KeyboardInterrupt:   # (a line on where the run stands, not a page of traceback)
        from .checkpoint import latest_checkpoint
        last = latest_checkpoint(cfg.output_dir)
        print("\nqlora-train: interrupted; " + (
            f"the last checkpoint is {last}: `{prog} --output-dir {cfg.output_dir} --resume` continues from it"
            if last else "no checkpoint was written yet"), file=sys.stderr)
        return 130
    before, after = r["eval_before"], r["eval_after"]
    if demo:
        print(f"sample (qlora-train generate --output-dir {cfg.output_dir} --prompt ...):\n{r['sample']}\n")
    print(f"report: {os.path.abspath(r['report']['markdown'])} (also {os.path.abspath(r['report']['json'])}"
          + (f", {os.path.abspath(r['report']['plot'])}" if r['report']['plot'] else "") + ")")
    print(f"adapters: {r['adapter']} (PEFT format: {r['peft_adapter']})")
    best = " (the best eval's adapters)" if cfg.load_best_model_at_end and r.get("best_eval") else ""
    stopped = ", stopped early" if r.get("stopped_early_at") else ""
    print(f"eval perplexity: before {before['ppl']:.2f} -> after {after['ppl']:.2f} at step {after['step']}{best} "
          f"({r['steps']} steps{stopped}, {r['tokens_per_s']:.0f} tokens/s, {time.perf_counter() - t0:.0f} s)")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    if command == "train" and argv and not argv[0].startswith("-"):   # (training takes flags only)
        print(f"qlora-train: error: unknown command {argv[0]!r}: give one of {', '.join(COMMANDS)}, or training "
              "flags (qlora-train --help)", file=sys.stderr)
        return 2
    try:
        if command == "study":
            from .study import main as study_main
            return study_main(argv)
        if command == "merge":
            from .merge import main as merge_main
            return merge_main(argv)
        if command == "quantize":
            from .quantize_model import main as quantize_main
            return quantize_main(argv)
        if command == "eval":
            from .eval_run import main as eval_main
            return eval_main(argv)
        if command == "generate":
            from .generate import main as generate_main
            return generate_main(argv)
        return run_train(argv, demo=command == "demo")
    except ConfigError as e:
        print(f"qlora-train: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
