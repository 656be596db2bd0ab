"""NEFTune (Jain et al. 2023, TRL's `neftune_noise_alpha`): while the model trains, uniform noise in
[-a, a], a = alpha / sqrt(L d), is added to the input embeddings of each [batch, L, d] batch; evaluation and
generation see the clean embeddings. The noise is drawn from torch's generator on the embeddings' device, whose
state a checkpoint keeps, so a resumed run draws what the uninterrupted one drew."""
from __future__ import annotations

import math

import torch


def _add_noise(module: torch.nn.Module, inputs, output: torch.Tensor):
    if not module.training:
        return output
    bound = module.neftune_noise_alpha / math.sqrt(output.shape[1] * output.shape[2])
    return output + torch.empty_like(output).uniform_(-bound, bound)


def add_neftune(model: torch.nn.Module, alpha: float):
    """Adds the noise to model.get_input_embeddings()'s output in training mode; returns the hook's handle
    (handle.remove() takes it away)."""
    if not alpha > 0:
        raise ValueError(f"NEFTune's alpha must be positive, got {alpha}")
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    if not isinstance(embeddings, torch.nn.Module):
        raise ValueError(f"NEFTune needs the model's input embeddings (get_input_embeddings()); "
                         f"{type(model).__name__} has none")
    embeddings.neftune_noise_alpha = float(alpha)
    return embeddings.register_forward_hook(_add_noise)
