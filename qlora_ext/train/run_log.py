"""The run's live log, written while it trains (the report comes at the end): <output_dir>/train_log.jsonl holds
one JSON object per optimizer step ({"step", "loss", "lr", "grad_norm", "tokens_per_s", "peak_memory_bytes"}) and
per evaluation ({"step", "eval_loss", "eval_ppl"}), a line at a time and flushed, so `tail -f` follows a run and
a crash loses nothing already logged. With --report-to tensorboard the same scalars go to TensorBoard event files
in <output_dir>/tensorboard (`tensorboard --logdir runs/`).

A resumed run continues from its checkpoint, not from the last line: both logs are written again from the
checkpoint's history (the steps after it were not kept and will be trained again; the events' wall times are the
resume's), then continued. A value that is not a finite number is written as null."""
from __future__ import annotations

import json
import math
import os
import shutil

from .._files import atomic_write_text
from .config import REPORT_TO, ConfigError

LOG_FILE = "train_log.jsonl"
TENSORBOARD_DIR = "tensorboard"


def eval_record(step: int, loss: float) -> dict:
    return {"step": step, "eval_loss": loss, "eval_ppl": math.exp(loss) if loss < 700 else math.inf}


def _json_line(record: dict) -> str:
    """One line of strict JSON: a value that is not a finite number (an overflowed perplexity) is null."""
    return json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v
                       for k, v in record.items()}, allow_nan=False) + "\n"


def summary_writer_class(report_to: str):
    """torch's TensorBoard SummaryWriter for --report-to tensorboard (None for none); a ConfigError where the
    tensorboard package it needs is missing (checked before the model loads, by the trainer's setup)."""
    if report_to not in REPORT_TO:
        raise ConfigError(f"--report-to must be one of {REPORT_TO}, got {report_to!r}")
    if report_to == "none":
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ConfigError(f"--report-to tensorboard needs the tensorboard package (pip install tensorboard, or the "
                          f"qlora_ext[tensorboard] extra): {e}") from e
    return SummaryWriter


class RunLog:
    """Opened once the run knows its state (after the eval before training, or the checkpoint it resumes from):
    writes that state's history, then each step(record) and evaluation(step, loss) as they come."""

    def __init__(self, output_dir: str, report_to: str, history: list, evals: list):
        self._writer = None
        SummaryWriter = summary_writer_class(report_to)
        # this run's events beyond its checkpoint, or an earlier run's, whatever --report-to says now
        shutil.rmtree(os.path.join(output_dir, TENSORBOARD_DIR), ignore_errors=True)
        if SummaryWriter is not None:
            self._writer = SummaryWriter(os.path.join(output_dir, TENSORBOARD_DIR))
        records = sorted([eval_record(e["step"], e["loss"]) for e in evals] + list(history),
                         key=lambda r: (r["step"], "eval_loss" in r))   # a step's training, then its eval
        path = os.path.join(output_dir, LOG_FILE)
        atomic_write_text(path, "".join(_json_line(r) for r in records))
        self._file = open(path, "a", encoding="utf-8")
        for r in records:
            self._scalars(r)

    def step(self, record: dict) -> None:
        self._write(record)

    def evaluation(self, step: int, loss: float) -> None:
        self._write(eval_record(step, loss))

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()

    def _write(self, record: dict) -> None:
        self._file.write(_json_line(record))
        self._file.flush()
        self._scalars(record)
        if self._writer is not None:
            self._writer.flush()

    def _scalars(self, record: dict) -> None:
        if self._writer is None:
            return
        for key, value in record.items():
            if key != "step" and value is not None and math.isfinite(value):
                tag = f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"
                self._writer.add_scalar(tag, value, record["step"])
