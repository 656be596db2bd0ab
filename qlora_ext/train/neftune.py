"""NEFTune (Jain et al. 2023, TRL's `neftune_noise_alpha`): while the model trains, uniform noise in
[-a, a], a = alpha / sqrt(L d), is added to the input embeddings of each [batch, L, d] batch; evaluation and
generation see the clean embeddings. The noise is drawn from torch's generator on the embeddings' device, whose
state a checkpoint keeps, so a resumed run draws what the uninterrupted one drew."""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch


def input_embeddings(model: torch.nn.Module) -> torch.nn.Module:
    """model.get_input_embeddings(), or ValueError where the model has none (transformers raises
    NotImplementedError for a model whose embeddings it cannot find)."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        embeddings = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        embeddings = None
    if not isinstance(embeddings, torch.nn.Module):
        raise ValueError(f"NEFTune needs the model's input embeddings (get_input_embeddings()); "
                         f"{type(model).__name__} has none")
    return embeddings


@contextlib.contextmanager
def neftune(model: torch.nn.Module, alpha: float) -> Iterator[None]:
    """Within the block, noise on model's input embeddings in training mode (nothing for alpha 0)."""
    if alpha == 0:
        yield
        return
    if not 0 < alpha < math.inf:
        raise ValueError(f"NEFTune's alpha must be positive and finite, got {alpha}")
    bound_factor = float(alpha)

    def add_noise(module, inputs, output: torch.Tensor):
        if not module.training:
            return output
        bound = bound_factor / math.sqrt(output.shape[1] * output.shape[2])
        return output + torch.empty_like(output).uniform_(-bound, bound)

    handle = input_embeddings(model).register_forward_hook(add_noise)
    try:
        yield
    finally:
        handle.remove()
