"""The run report: report.json (every number), report.md (a short table for people) and loss.png (train
loss per step with the eval loss points), written into the run's output folder."""
from __future__ import annotations

import json
import math
import os

from .._files import atomic_write, atomic_write_text
from .output_dir import REPORT_FILES


def _packing(data: dict) -> str:
    """', 1,234 examples packed best fit (bfd), 0.4% padding' for a bfd run (older reports: nothing)."""
    if data.get("packing") != "bfd":
        return ""
    blocks = (data["train_blocks"] + data["eval_blocks"]) * data["seq_len"]
    return (f", {data['examples']:,} examples packed best fit (bfd), "
            f"{100 * data['padding_tokens'] / max(blocks, 1):.1f}% padding")


def _gib(n) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def _names(names: list) -> str:
    """Module names for the table: a long list (full paths, as --init-adapter takes them) as its first few."""
    return ",".join(names) if len(names) <= 8 else f"{','.join(names[:3])}, ... ({len(names)} modules)"


def _trained_rows(c: dict) -> str:
    tokens = c.get("trainable_token_indices")
    # (a "|" in a token, as in "<|im_start|>", would end the table's cell)
    return f"; trained embedding rows: {_names(tokens)}".replace("|", "\\|") if tokens else ""


def _patterns(c: dict) -> str:
    # (a "|" in a pattern, as in "layers\\.(0|1)", would end the table's cell)
    return "".join(f"; {key} {json.dumps(c[key])}".replace("|", "\\|") for key in ("rank_pattern", "alpha_pattern")
                   if c.get(key))


def markdown(r: dict) -> str:
    c = r["config"]
    before, after = r["eval_before"], r["eval_after"]
    bits = r["base_bits_per_param"]
    mem = r["memory"]
    lines = [
        "# qlora_ext training run", "",
        f"model `{r['model_dir']}` on {r['device']}, torch {r['torch']}", "",
        "| | |", "| --- | --- |",
        f"| base | {_base(r)} |",
        f"| base bits/param (measured) | {'%.3f' % bits if bits is not None else 'dense'} |",
        f"| {'DoRA' if c.get('use_dora') else 'LoRA'} | r={c['r']}, alpha={c['alpha']}"
        f"{' (rsLoRA: alpha / sqrt(r))' if c.get('use_rslora') else ''}{_patterns(c)}, "
        f"dropout={c['dropout']}, targets "
        f"{_names(c['target_modules']) if c['target_modules'] else 'all linear but lm_head'}"
        f"{'; trained whole: ' + _names(c['modules_to_save']) if c.get('modules_to_save') else ''}"
        f"{_trained_rows(c)} |",
        f"| trainable params | {r['trainable_params']:,} of {r['total_params']:,} "
        f"({100 * r['trainable_params'] / max(r['total_params'], 1):.2f}%) |",
        f"| data | {r['data']['files']} file(s), {r['data']['tokens']:,} tokens, {r['data']['train_blocks']} train / "
        f"{r['data']['eval_blocks']} eval blocks of {r['data']['seq_len']}{_packing(r['data'])} |",
        f"| steps | {r['steps']} x batch {c['batch_size']} x accum {c['grad_accum']}, lr {c['lr']} "
        f"({c['schedule']}, warmup {c['warmup_steps']}), optimizer {c['optimizer']} |",
        f"| tokens/s (training) | {r['tokens_per_s']:.0f} ({r['tokens_trained']:,} tokens in "
        f"{r['train_seconds']:.0f} s) |",
        f"| peak memory | {_gib(mem.get('peak'))}" + (
            f" (torch {_gib(mem.get('cuda_max_allocated'))} + optimizer managed {_gib(mem.get('optimizer_managed'))}; "
            f"device-wide now {_gib(mem.get('device_used_now'))})" if 'cuda_max_allocated' in mem
            else " (process peak RSS)") + " |",
    ]
    if r.get("base_quantized_while_loading"):
        lines.append("| base | quantized as the checkpoint was read (`--load-in-4bit`): no dense model held |")
    if r.get("base_from_4bit_checkpoint"):
        lines.append("| base | a 4-bit checkpoint (`qlora-train quantize` / `save_4bit`), read as it was saved |")
    if r.get("dense_eval_loss") is not None:
        d = r["dense_eval_loss"]
        lines.append(f"| eval perplexity, dense base | {math.exp(d):.2f} (loss {d:.4f}) |")
    if before:
        lines.append(f"| eval perplexity, before training | {before['ppl']:.2f} (loss {before['loss']:.4f}) |")
    if after:
        lines.append(f"| eval perplexity, after {after['step']} steps | {after['ppl']:.2f} (loss {after['loss']:.4f}) |")
    if r.get("stopped_early_at"):
        lines.append(f"| stopped early | at step {r['stopped_early_at']} of {c['steps']}: "
                     f"{c['early_stopping_patience']} evals in a row without a lower eval loss |")
    if c.get("load_best_model_at_end") and r.get("best_eval"):
        last = r["evals"][-1]
        lines.append(f"| adapters saved | the best eval's (step {r['best_eval']['step']}; the last eval, step "
                     f"{last['step']}: perplexity {last['ppl']:.2f}) |")
    lines += ["", f"adapters: `{r['adapter']}`"]
    if r.get("peft_adapter"):
        lines += [f"PEFT adapter folder (`peft.PeftModel.from_pretrained(base, folder)`): `{r['peft_adapter']}`"]
    lines += ["", "![loss](loss.png)", ""]
    return "\n".join(lines)


def _base(r: dict) -> str:
    """The base's format: the run's flags, or for a base that came 4-bit (a save_4bit or bitsandbytes checkpoint)
    the formats its layers hold."""
    c = r["config"]
    if r.get("base_from_4bit_checkpoint") and r.get("base_formats"):
        return "; ".join(r["base_formats"]) + " (as the 4-bit checkpoint holds them)"
    return c["quant_type"] + (f" + double quant, blocksize {c['blocksize']}"
                              if c["quant_type"] != "none" and c["double_quant"] else "")


def plot_loss(r: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    h = r["history"]
    ax.plot([x["step"] for x in h], [x["loss"] for x in h], lw=1, label="train loss")
    ev = r["evals"]
    ax.plot([x["step"] for x in ev], [x["loss"] for x in ev], "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    c = r["config"]
    quant = "4-bit checkpoint" if r.get("base_from_4bit_checkpoint") else c["quant_type"]
    ax.set_title(f"{os.path.basename(r['model_dir'].rstrip('/'))}: {quant} base, LoRA r={c['r']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:   # the temporary name has no .png: say the format
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)


def write_report(r: dict, output_dir: str) -> dict:
    """Writes report.json, report.md and loss.png; returns their paths."""
    paths = {k: os.path.join(output_dir, f) for k, f in zip(("json", "markdown", "plot"), REPORT_FILES)}
    atomic_write_text(paths["json"], json.dumps(r, indent=2) + "\n")
    atomic_write_text(paths["markdown"], markdown(r))
    try:
        plot_loss(r, paths["plot"])
    except ImportError:
        paths["plot"] = None   # matplotlib is optional: the JSON and Markdown are the report
    return paths
