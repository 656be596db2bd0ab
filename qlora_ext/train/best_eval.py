"""--load-best-model-at-end and --early-stopping-patience, Hugging Face Trainer's load_best_model_at_end and
EarlyStoppingCallback on the eval loss: which eval is the best so far, when to stop, and the files that keep
the best eval's adapters until the run ends.

The best adapters are written as checkpoints/best-step-NNNNNN.safetensors when an eval improves, and each
checkpoint holds a copy of the best one it knows (best.safetensors), which a resume puts back: a run resumed
from any checkpoint finds the adapters its state calls the best, even where its evals after the checkpoint
come out otherwise than the first time (another device) and name another step."""
import glob
import math
import os
import shutil
from typing import Optional, Tuple

from .checkpoint import checkpoint_dir

IN_CHECKPOINT = "best.safetensors"


def best_adapter_path(output_dir: str, step: int) -> str:
    # under checkpoints/, so that a new run in the same folder removes them with the checkpoints
    return os.path.join(checkpoint_dir(output_dir), f"best-step-{step:06d}.safetensors")


def observe_eval(state: dict, step: int, loss: float, patience: int, threshold: float) -> Tuple[bool, bool]:
    """Takes the eval at `step` into the trainer state's "best" ({"step", "loss"}: the lowest eval loss so far)
    and "evals_without_improvement"; returns (whether it is a new best, whether to stop now).

    As in transformers: the best is the lowest loss, and for early stopping an eval counts as an improvement
    only when it is lower than the best before it by more than `threshold` (the first finite eval always
    counts); `patience` evals in a row that are not stop the run (0: never). A non-finite loss is never the
    best, and counts against the patience."""
    best = state.get("best")
    improved = math.isfinite(loss) and (best is None or loss < best["loss"])
    counts = improved and (best is None or best["loss"] - loss > threshold)
    state["evals_without_improvement"] = 0 if counts else state.get("evals_without_improvement", 0) + 1
    if improved:
        state["best"] = {"step": step, "loss": loss}
    return improved, patience > 0 and state["evals_without_improvement"] >= patience


def save_best_adapters(output_dir: str, model, config: dict, step: int) -> None:
    """Writes the model's adapters as the best eval's, at `step` (atomically; the step in the metadata too)."""
    from .checkpoint import save_adapters
    path = best_adapter_path(output_dir, step)
    os.makedirs(os.path.dirname(path), exist_ok=True)   # (the first eval may come before the first checkpoint)
    save_adapters(path, model, dict(config, best_step=step))


def for_checkpoint(output_dir: str, state: dict) -> dict:
    """The extra_files of a checkpoint (save_checkpoint): a copy of the best adapters the state names. Older best
    files go: a checkpoint keeps its own copy."""
    best = state.get("best")
    if not best:
        return {}
    keep = best_adapter_path(output_dir, best["step"])
    for path in glob.glob(os.path.join(checkpoint_dir(output_dir), "best-step-*.safetensors")):
        if os.path.abspath(path) != os.path.abspath(keep):
            os.remove(path)
    return {IN_CHECKPOINT: keep} if os.path.exists(keep) else {}


def restore_from_checkpoint(output_dir: str, checkpoint: str, state: dict) -> None:
    """Puts the best adapters a resumed checkpoint holds back where the run looks for them."""
    best = state.get("best")
    source = os.path.join(checkpoint, IN_CHECKPOINT)
    if best and os.path.exists(source):
        target = best_adapter_path(output_dir, best["step"])
        shutil.copyfile(source, target + ".tmp")
        os.replace(target + ".tmp", target)


def saved_best_step(path: str) -> Optional[int]:
    from .checkpoint import read_adapter_config
    return read_adapter_config(path).get("best_step") if os.path.exists(path) else None
