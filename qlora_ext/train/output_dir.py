"""--output-dir: what a run may do with the folder, checked before the model loads. A new run never lands on
another run's files unless told to (--overwrite-output-dir), never on a model's folder, and a folder that
cannot be written is said so by name; a new run told to start over removes the previous run's files, so that
eval, merge and generate never take that run's adapters for this one's."""
import json
import os
import shutil
from typing import Optional

from .checkpoint import ADAPTER_FILE, CONFIG_FILE, checkpoint_steps
from .config import ConfigError
from .run_log import remove_run_logs

PEFT_DIR = "peft_adapter"   # <output_dir>/peft_adapter: the adapters in PEFT's format
REPORT_FILES = ("report.json", "report.md", "loss.png")
CHECKPOINTS_DIR = "checkpoints"


def _run_config(output_dir: str) -> Optional[dict]:
    """The folder's config.json if it is a run's (a TrainConfig), else None."""
    try:
        with open(os.path.join(output_dir, CONFIG_FILE)) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) and "output_dir" in saved and "quant_type" in saved else None


def previous_run(output_dir: str) -> Optional[str]:
    """What run the folder holds, in words ("a finished run", "an interrupted run (its last checkpoint is step
    50)"), or None."""
    steps = checkpoint_steps(output_dir)
    finished = os.path.exists(os.path.join(output_dir, ADAPTER_FILE))
    if not steps and not finished and _run_config(output_dir) is None:
        return None
    if finished:
        return "a finished run"
    if steps:
        return f"an interrupted run (its last checkpoint is step {steps[-1]})"
    return "a run stopped before its first checkpoint"


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def check_writable(path: str, flag: str) -> None:
    """ConfigError where the folder `path` (or the nearest existing folder above it) cannot be written."""
    existing = _nearest_existing(path)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: cannot write in {existing} (permissions, or a read-only file system)")


def check_output_dir(output_dir: str, resume: bool, overwrite: bool, model: Optional[str] = None) -> None:
    """ConfigError where --output-dir cannot take this run: empty, a file, not writable, a model's folder (its
    config.json would be overwritten), or a folder holding another run without --resume or
    --overwrite-output-dir."""
    if not output_dir:
        raise ConfigError("--output-dir is empty: give the folder the run writes to")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ConfigError(f"--output-dir {output_dir} is a file, not a folder")
    check_writable(output_dir, "--output-dir")
    if resume:
        return
    if model is not None and os.path.isdir(model) and os.path.realpath(model) == os.path.realpath(output_dir):
        raise ConfigError(f"--output-dir {output_dir} is the --model folder: the run's config.json would replace "
                          "the model's; give another --output-dir")
    config = os.path.join(output_dir, CONFIG_FILE)
    if os.path.exists(config) and _run_config(output_dir) is None:
        raise ConfigError(f"--output-dir {output_dir} holds a config.json that is not a run's (a model's?), which "
                          "the run would replace; give another --output-dir")
    run = previous_run(output_dir)
    if run is not None and not overwrite:
        hint = "--resume continues it, " if run.startswith("an interrupted") else ""
        raise ConfigError(f"--output-dir {output_dir} holds {run}: {hint}--overwrite-output-dir starts a new run "
                          "there (removing that run's checkpoints, adapters, logs and report), or give another "
                          "--output-dir")


def clear_previous_run(output_dir: str) -> bool:
    """Removes a previous run's files from output_dir (its checkpoints, adapters, PEFT folder, logs and report;
    nothing else); whether there was one."""
    if previous_run(output_dir) is None:
        remove_run_logs(output_dir)   # (logs of a run that never got further)
        return False
    shutil.rmtree(os.path.join(output_dir, CHECKPOINTS_DIR), ignore_errors=True)
    shutil.rmtree(os.path.join(output_dir, PEFT_DIR), ignore_errors=True)
    for name in (ADAPTER_FILE, CONFIG_FILE, *REPORT_FILES):
        path = os.path.join(output_dir, name)
        if os.path.isfile(path):
            os.remove(path)
    remove_run_logs(output_dir)
    return True
