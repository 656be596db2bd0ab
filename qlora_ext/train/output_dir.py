"""--output-dir: what a run may do with the folder, checked before the model loads. A new run never lands on
another run's files unless told to (--overwrite-output-dir), never on a model's folder, and a folder that
cannot be written is said so by name; a new run told to start over removes the previous run's files (its
own names only: other files and folders stay), so that eval, merge and generate never take that run's
adapters for this one's."""
import json
import os
import shutil
import tempfile
from typing import Iterable, List, Optional

from .best_eval import IN_CHECKPOINT
from .checkpoint import ADAPTER_FILE, CHECKPOINTS_DIR, CONFIG_FILE, checkpoint_steps
from .config import ConfigError
from .run_log import LOG_FILE, TENSORBOARD_DIR

PEFT_DIR = "peft_adapter"   # <output_dir>/peft_adapter: the adapters in PEFT's format
REPORT_FILES = ("report.json", "report.md", "loss.png")


def own_paths(output_dir: str) -> List[str]:
    """What a run writes in output_dir (files and folders): what a --data folder search leaves out (of
    checkpoints/, a run writes only some entries: _removed_paths)."""
    names = (CONFIG_FILE, ADAPTER_FILE, PEFT_DIR, LOG_FILE, TENSORBOARD_DIR, CHECKPOINTS_DIR, *REPORT_FILES)
    return [os.path.join(output_dir, n) for n in names]


def _removed_paths(output_dir: str) -> List[str]:
    """What starting over in output_dir removes, as it exists now: the run's files, folders and links (a link
    as the link), and of a checkpoints/ folder only the entries runs write there (the folder too when that
    leaves it empty)."""
    paths = []
    for path in own_paths(output_dir):
        if os.path.basename(path) == CHECKPOINTS_DIR and os.path.isdir(path) and not os.path.islink(path):
            paths += _checkpoint_entries(output_dir)
        elif os.path.lexists(path):
            paths.append(path)
    return paths


def _checkpoint_entries(output_dir: str) -> List[str]:
    """The entries of checkpoints/ that runs write: step-N folders (and their temporary names), `latest`, the
    best eval's adapters."""
    root = os.path.join(output_dir, CHECKPOINTS_DIR)
    names = os.listdir(root) if os.path.isdir(root) and not os.path.islink(root) else []
    return [os.path.join(root, d) for d in names
            if d.startswith(("step-", ".step-", "best-step-")) or d in ("latest", IN_CHECKPOINT)]


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
    """ConfigError where the folder `path` (or the nearest existing folder above it) cannot be written: a file is
    made there and removed (permissions alone say nothing to root, nor of read-only or pseudo file systems)."""
    existing = _nearest_existing(path)
    try:
        if not os.path.isdir(existing):
            raise NotADirectoryError(f"{existing} is a file")
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot write in {existing} ({e.strerror or e}: permissions, or a "
                          "read-only file system)") from None


def _inside(path: str, removed: str) -> bool:
    """Whether path is the removed path or inside it (a removed link takes only the paths through the link)."""
    path = os.path.abspath(path) if os.path.islink(removed) else os.path.realpath(path)
    removed = os.path.abspath(removed) if os.path.islink(removed) else os.path.realpath(removed)
    return path == removed or path.startswith(removed.rstrip(os.sep) + os.sep)


def check_output_dir(output_dir: str, resume: bool, overwrite: bool, model: Optional[str] = None,
                     inputs: Iterable[Optional[str]] = ()) -> None:
    """ConfigError where --output-dir cannot take this run: empty, a file, not writable, a model's folder (its
    config.json would be overwritten), a folder holding another run (or its logs) without --resume or
    --overwrite-output-dir, or, with --overwrite-output-dir, one whose run files hold the run's own inputs
    (`inputs`: --init-adapter, --data)."""
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
    removed = _removed_paths(output_dir)
    present = sorted({os.path.relpath(p, output_dir).split(os.sep)[0] for p in removed})
    if present and not overwrite:
        what = run or f"{', '.join(present)}, which the run would replace"
        hint = "--resume continues it, " if run and run.startswith("an interrupted") else ""
        raise ConfigError(f"--output-dir {output_dir} holds {what}: {hint}--overwrite-output-dir starts a new run "
                          "there (removing that run's checkpoints, adapters, logs and report), or give another "
                          "--output-dir")
    if overwrite:
        for given in (p for p in inputs if p):
            if any(_inside(given, p) for p in removed):
                raise ConfigError(f"{given} is inside the files of the run in --output-dir {output_dir}, which "
                                  "--overwrite-output-dir removes before the run reads it: copy it elsewhere first")


def _remove(path: str) -> None:
    """path gone: a link itself (never what it points at), a file, or a folder."""
    try:
        if os.path.islink(path) or os.path.isfile(path):
            os.unlink(path)
        elif os.path.isdir(path):
            shutil.rmtree(path)
    except OSError as e:
        raise ConfigError(f"--overwrite-output-dir: cannot remove the previous run's {path}: {e}") from e


def clear_previous_run(output_dir: str) -> bool:
    """Removes a previous run's files from output_dir (its checkpoints, adapters, PEFT folder, logs and report,
    by the names a run writes; nothing else), a link among them as the link; whether there was a run."""
    had_run = previous_run(output_dir) is not None
    for path in _removed_paths(output_dir):
        _remove(path)
    checkpoints = os.path.join(output_dir, CHECKPOINTS_DIR)
    if os.path.isdir(checkpoints) and not os.path.islink(checkpoints) and not os.listdir(checkpoints):
        os.rmdir(checkpoints)
    return had_run
