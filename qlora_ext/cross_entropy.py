"""Cross-entropy of a linear head (a language model's lm_head) computed a chunk of tokens at a time, so the
[tokens, vocab] logits never exist whole: the functional form the trainer's loss uses."""
from typing import Optional

import torch

from ._ops import ops


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         bias: Optional[torch.Tensor] = None, ignore_index: int = -100,
                         chunk_rows: int = 0) -> torch.Tensor:
    """Mean over the labels that are not ignore_index of cross_entropy(hidden @ weight.T + bias, labels), as
    `F.cross_entropy(F.linear(hidden, weight, bias).float(), labels)` computes it, without the logits.

    hidden [..., hidden_size] and labels [...] (int64) with the same leading shape; weight [vocab, hidden_size]
    and bias [vocab]. Differentiable in hidden, weight and bias (a trained head: PEFT's
    modules_to_save=["lm_head"]); the gradients are computed during the forward pass, a chunk at a time, so
    the memory of the logits is one chunk (chunk_rows rows, 0: about 8M logits, and at least 1024 rows when
    the head trains), and a trained head's gradient is summed over the chunks in float32 (one weight-sized
    float32 buffer from the forward to the backward). Under torch.autocast, hidden, weight and bias are cast
    to the autocast dtype first (as nn.Linear would be); the softmax runs in float32. NaN when every label is
    ignore_index (as torch's mean cross-entropy)."""
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels must have hidden's leading shape {tuple(hidden.shape[:-1])}, got "
                         f"{tuple(labels.shape)}")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    grad_enabled = torch.is_grad_enabled()
    compute_grad = hidden.requires_grad and grad_enabled
    compute_head_grad = grad_enabled and (weight.requires_grad or (bias is not None and bias.requires_grad))
    loss = ops.linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, bias, labels.reshape(-1),
                                    ignore_index, compute_grad, chunk_rows, compute_head_grad)[0]
    return loss
