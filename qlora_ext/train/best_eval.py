"""--load-best-model-at-end and --early-stopping-patience, Hugging Face Trainer's load_best_model_at_end and
EarlyStoppingCallback on the eval loss: which eval is the best so far, when to stop, and the file that keeps
the best eval's adapters until the run ends."""
import math
import os
from typing import Tuple

# Under checkpoints/, so that a new run in the same folder removes it with the checkpoints.
BEST_FILE = "best.safetensors"


def best_adapter_path(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints", BEST_FILE)


def save_best_adapters(output_dir: str, model, config: dict, step: int) -> None:
    """Writes the model's adapters as the best eval's (atomically; the step in the file's metadata)."""
    from .checkpoint import save_adapters
    path = best_adapter_path(output_dir)
    os.makedirs(os.path.dirname(path), exist_ok=True)   # (the first eval may come before the first checkpoint)
    save_adapters(path, model, dict(config, best_step=step))


def observe_eval(state: dict, step: int, loss: float, patience: int, threshold: float) -> Tuple[bool, bool]:
    """Takes the eval at `step` into the trainer state's "best" ({"step", "loss"}: the lowest eval loss so far)
    and "evals_without_improvement"; returns (whether it is a new best, whether to stop now).

    As in transformers: the best is the lowest loss, and for early stopping an eval counts as an improvement
    only when it is lower than the best before it by more than `threshold`; `patience` evals in a row that
    are not stop the run (0: never). A non-finite loss is never the best."""
    best = state.get("best")
    improved = math.isfinite(loss) and (best is None or loss < best["loss"])
    counts = improved and (best is None or best["loss"] - loss > threshold)
    state["evals_without_improvement"] = 0 if counts else state.get("evals_without_improvement", 0) + 1
    if improved:
        state["best"] = {"step": step, "loss": loss}
    return improved, patience > 0 and state["evals_without_improvement"] >= patience
