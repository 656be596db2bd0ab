"""The trainer's next-token loss. For the causal-LM classes whose logits are a plain linear head over the
decoder's last hidden states, the loss goes through qlora_ext.linear_cross_entropy (a chunk of tokens at a
time: the [tokens, vocab] logits, their log-softmax and gradients never exist whole), also when the head
trains (modules_to_save, trainable tokens) on at least hidden_size tokens; any other model, a head with an
adapter, or a trained head on fewer tokens uses the model's own loss (model(input_ids, labels=...))."""
import contextlib
from typing import Optional

import torch
from torch import nn

from ..cross_entropy import linear_cross_entropy
from ..modules_to_save import ModuleToSave
from ..trainable_tokens import TiedTokensHead

# Transformers classes whose forward is exactly: hidden = self.model(...).last_hidden_state;
# logits = self.lm_head(hidden); loss = mean cross-entropy of logits[:, :-1] against input_ids[:, 1:].
# (Not e.g. Gemma 2, which soft-caps its logits, or the MoE classes, which add a router loss.)
PLAIN_HEAD_CLASSES = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"})


def fused_head(model: nn.Module, tokens: Optional[int] = None):
    """(decoder, lm_head) when the loss can skip the logits, else None. tokens: the predicted tokens of the
    batch; a trained head takes the chunked loss only for at least as many tokens as it has inputs
    (hidden_size): its gradient there costs a few float32 copies of its weight (~V H), the logits path's a few
    [tokens, V] tensors, so below that the logits path needs less memory (a trained bf16 32000 x 4096 head on
    the CPU, peak memory of the loss and its backward: 1.34 GB against 0.28 GB at 512 tokens, 1.48 against
    1.50 GB at 4096)."""
    if type(model).__name__ not in PLAIN_HEAD_CLASSES:
        return None
    decoder, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    if isinstance(head, ModuleToSave):   # trained whole (or its frozen original, while adapters are disabled)
        head = head.active()
    if decoder is None or (type(head) is not nn.Linear and not isinstance(head, TiedTokensHead)):
        return None   # a LoRA-wrapped or quantized head: the model's own path
    trains = (isinstance(head, TiedTokensHead) and head.tokens.enabled) or any(
        p.requires_grad for p in head.parameters())
    if trains and tokens is not None and tokens < head.in_features:
        return None
    return decoder, head


def causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                   position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean cross-entropy of predicting labels[:, 1:] (default: input_ids[:, 1:]; -100 marks a token that is
    not trained on) from the prefixes: the same value as model(input_ids=input_ids, labels=labels).loss.
    position_ids (packed examples, each counting from 0) go to the model, whose attention mask then keeps
    each example to itself."""
    labels = input_ids if labels is None else labels
    parts = fused_head(model, tokens=input_ids.shape[0] * (input_ids.shape[1] - 1) if torch.is_grad_enabled()
                       else None)
    if parts is None:
        return model(input_ids=input_ids, labels=labels, position_ids=position_ids, use_cache=False).loss
    decoder, head = parts
    hidden = decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
    # The last position predicts past the block (its label is ignored in the usual path): leave it out.
    # (a head tied to trainable tokens computes with their trained rows: its merged weight)
    weight = head.merged_weight() if isinstance(head, TiedTokensHead) else head.weight
    return linear_cross_entropy(hidden[:, :-1], weight, labels[:, 1:], bias=head.bias)


def vocab_size(model: nn.Module) -> int:
    """Rows of the input embedding (what ids can be), else config.vocab_size, else 0."""
    try:
        return int(model.get_input_embeddings().num_embeddings)
    except (AttributeError, NotImplementedError, TypeError):
        return int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)


@torch.no_grad()
def packed_attention_problem(model: nn.Module, device: torch.device, autocast=None,
                             max_length: int = 0) -> Optional[str]:
    """None when the model keeps packed examples apart, else why not. bfd packing relies on it: transformers
    builds such masks from position_ids (masking_utils), but a model with its own attention code
    (trust_remote_code, an old architecture) may ignore them. The probe: one short example packed after another
    example at the end of one row and between two examples in the other, position ids counting from 0 for each
    example. It must give, within rounding, the same logits in both rows and alone; without the position ids
    (attention across examples) the two rows differ.
    max_length: the model's longest sequence (0: no limit), so the probe fits learned position tables."""
    vocab = vocab_size(model)
    if vocab < 2:
        return "the model has no input embedding or config.vocab_size to build a probe from"
    n = 32 if not max_length else min(32, max_length)
    if n < 8:
        return f"the model allows only {max_length} positions, too few for a probe"
    short = n // 4
    at = (n - short) // 2        # where the short example sits in row 1
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, n), generator=g)
    ids[1, at:at + short] = ids[0, n - short:]
    positions = torch.stack([torch.cat([torch.arange(n - short), torch.arange(short)]),
                             torch.cat([torch.arange(at), torch.arange(short), torch.arange(n - short - at)])])
    was_training = model.training
    model.eval()
    try:
        with autocast if autocast is not None else contextlib.nullcontext():
            def logits(rows, pos=None):
                return model(input_ids=rows.to(device), position_ids=None if pos is None else pos.to(device),
                             use_cache=False).logits.float()
            packed = logits(ids, positions)
            shared = logits(ids)
            alone = logits(ids[:1, n - short:])[0]
    finally:
        model.train(was_training)
    packed = packed[0, n - short:], packed[1, at:at + short]
    shared = shared[0, n - short:], shared[1, at:at + short]
    rows_error = float((packed[0] - packed[1]).abs().max())
    alone_error = float((packed[0] - alone).abs().max())
    shared_error = float((shared[0] - shared[1]).abs().max())
    # Kept apart, the differences are rounding (bf16 on SmolLM2: 0 between the rows, 0.86 from alone, against
    # 13 across examples); mixed, they are of the size of the difference across examples.
    if shared_error == 0 or max(rows_error, alone_error) <= 0.25 * shared_error:
        return None
    return (f"its attention does not keep packed examples apart by their position ids (a short example packed "
            f"after others gives logits {rows_error:.3g} apart in two packings and {alone_error:.3g} from its "
            f"logits alone; {shared_error:.3g} apart with attention across examples)")
