"""The trainer's next-token loss. For the causal-LM classes whose logits are a plain linear head over the
decoder's last hidden states, the loss goes through qlora_ext.linear_cross_entropy (a chunk of tokens at a
time: the [tokens, vocab] logits, their log-softmax and gradients never exist whole); any other model, or
a head with trainable weights or an adapter, uses the model's own loss (model(input_ids, labels=...))."""
from typing import Optional

import torch
from torch import nn

from ..cross_entropy import linear_cross_entropy

# Transformers classes whose forward is exactly: hidden = self.model(...).last_hidden_state;
# logits = self.lm_head(hidden); loss = mean cross-entropy of logits[:, :-1] against input_ids[:, 1:].
# (Not e.g. Gemma 2, which soft-caps its logits, or the MoE classes, which add a router loss.)
PLAIN_HEAD_CLASSES = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"})


def fused_head(model: nn.Module):
    """(decoder, lm_head) when the loss can skip the logits, else None."""
    if type(model).__name__ not in PLAIN_HEAD_CLASSES:
        return None
    decoder, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    if decoder is None or type(head) is not nn.Linear:  # a LoRA-wrapped or quantized head: the model's own path
        return None
    if any(p.requires_grad for p in head.parameters()):
        return None
    return decoder, head


def causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean cross-entropy of predicting labels[:, 1:] (default: input_ids[:, 1:]; -100 marks a token that is
    not trained on) from the prefixes: the same value as model(input_ids=input_ids, labels=labels).loss."""
    labels = input_ids if labels is None else labels
    parts = fused_head(model)
    if parts is None:
        return model(input_ids=input_ids, labels=labels, use_cache=False).loss
    decoder, head = parts
    hidden = decoder(input_ids=input_ids, use_cache=False).last_hidden_state
    # The last position predicts past the block (its label is ignored in the usual path): leave it out.
    return linear_cross_entropy(hidden[:, :-1], head.weight, labels[:, 1:], bias=head.bias)
