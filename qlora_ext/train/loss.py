"""The trainer's next-token loss. For the causal-LM classes whose logits are a plain linear head over the
decoder's last hidden states, the loss goes through qlora_ext.linear_cross_entropy (a chunk of tokens at a
time: the [tokens, vocab] logits, their log-softmax and gradients never exist whole); any other model, or
a head with trainable weights or an adapter, uses the model's own loss (model(input_ids, labels=...))."""
import contextlib
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


def causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                   position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean cross-entropy of predicting labels[:, 1:] (default: input_ids[:, 1:]; -100 marks a token that is
    not trained on) from the prefixes: the same value as model(input_ids=input_ids, labels=labels).loss.
    position_ids (packed examples, each counting from 0) go to the model, whose attention mask then keeps
    each example to itself."""
    labels = input_ids if labels is None else labels
    parts = fused_head(model)
    if parts is None:
        return model(input_ids=input_ids, labels=labels, position_ids=position_ids, use_cache=False).loss
    decoder, head = parts
    hidden = decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
    # The last position predicts past the block (its label is ignored in the usual path): leave it out.
    return linear_cross_entropy(hidden[:, :-1], head.weight, labels[:, 1:], bias=head.bias)


@torch.no_grad()
def packed_attention_problem(model: nn.Module, device: torch.device, autocast=None) -> Optional[str]:
    """None when the model keeps packed examples apart, else why not. bfd packing relies on it: transformers
    builds such masks from position_ids (masking_utils), but a model with its own attention code
    (trust_remote_code, an old architecture) may ignore them. The probe: a short example packed after each of
    two different longer ones, position ids counting from 0 for each example, must give the same logits both
    times (the same shapes, so rounding cannot tell them apart where the examples are kept apart), while
    without the position ids (attention across both examples) they differ."""
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)
    if vocab < 2:
        return "the model has no config.vocab_size to build a probe from"
    g = torch.Generator().manual_seed(0)
    firsts, second = torch.randint(0, vocab, (2, 24), generator=g), torch.randint(0, vocab, (1, 8), generator=g)
    rows = torch.cat([firsts, second.expand(2, -1)], dim=1).to(device)
    positions = torch.cat([torch.arange(24), torch.arange(8)]).expand(2, -1).to(device)
    was_training = model.training
    model.eval()
    try:
        with autocast if autocast is not None else contextlib.nullcontext():
            packed = model(input_ids=rows, position_ids=positions, use_cache=False).logits[:, 24:].float()
            shared = model(input_ids=rows, use_cache=False).logits[:, 24:].float()
    finally:
        model.train(was_training)
    packed_error = float((packed[0] - packed[1]).abs().max())
    shared_error = float((shared[0] - shared[1]).abs().max())
    if packed_error <= 0.05 * shared_error or shared_error == 0:
        return None
    return (f"its attention does not keep packed examples apart by their position ids (a short example packed "
            f"after two different ones gives logits {packed_error:.3g} apart; {shared_error:.3g} with attention "
            "across both)")
