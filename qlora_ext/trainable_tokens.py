"""Rows of a token embedding trained on their own, PEFT's `trainable_token_indices`: a chat model's special
tokens (<|im_start|>, which a base model's pretraining seldom or never saw) learn their embeddings without
training, or keeping optimizer states for, the whole [vocab, hidden] matrix as modules_to_save=["embed_tokens"]
would.

TrainableTokens wraps an nn.Embedding: its frozen weight with the chosen rows replaced by a trained float32
`trainable_tokens_delta` [tokens, hidden] (despite PEFT's name, the rows' values, not a difference; they start
at the rows' own values, so the model starts unchanged). Where the LM head shares the embedding's weight (tied
embeddings: SmolLM2, Llama 3.2), the head is wrapped in a TiedTokensHead that reads the same rows, as PEFT
does."""
from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn


class TrainableTokens(nn.Module):
    """base_layer (a frozen nn.Embedding) whose rows token_indices are the trained trainable_tokens_delta; with
    `enabled` False (adapters_disabled) the base runs as it is. Attributes it does not have (num_embeddings,
    embedding_dim, weight, ...) are the base's."""

    def __init__(self, embedding: nn.Embedding, token_indices: Sequence[int]):
        super().__init__()
        indices = checked_indices(token_indices, embedding.num_embeddings, "trainable_token_indices")
        self.base_layer = embedding
        for p in embedding.parameters():
            p.requires_grad_(False)
        self.register_buffer("token_indices", torch.tensor(indices, dtype=torch.long,
                                                           device=embedding.weight.device), persistent=False)
        rows = embedding.weight.detach()[self.token_indices]
        self.trainable_tokens_delta = nn.Parameter(rows.float().clone())
        self.enabled = True

    def indices(self) -> List[int]:
        return self.token_indices.tolist()

    def merged_weight(self) -> torch.Tensor:
        """The embedding matrix the model computes with: the base's, its chosen rows the trained ones (the base's
        own while disabled). Differentiable in trainable_tokens_delta; the base weight is not changed."""
        weight = self.base_layer.weight
        if not self.enabled:
            return weight
        return weight.index_copy(0, self.token_indices, self.trainable_tokens_delta.to(weight.dtype))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base_layer(input_ids)
        # the base's own forward (a subclass may scale its output, as Gemma's embeddings do) with the merged weight
        return torch.func.functional_call(self.base_layer, {"weight": self.merged_weight()}, (input_ids,))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name in ("base_layer", "enabled"):
                raise
            return getattr(self.base_layer, name)


class TiedTokensHead(nn.Module):
    """An LM head (nn.Linear) whose weight is tied to a TrainableTokens' embedding: it computes with the same
    merged weight, so the trained rows are also the trained tokens' output embeddings (as in PEFT)."""

    def __init__(self, head: nn.Linear, tokens: TrainableTokens):
        super().__init__()
        if head.weight is not tokens.base_layer.weight:
            raise ValueError("TiedTokensHead: the head's weight is not the embedding's")
        self.base_layer = head
        self._tokens = [tokens]   # (a list: not a submodule, so the trained rows are registered once)

    @property
    def tokens(self) -> TrainableTokens:
        return self._tokens[0]

    def merged_weight(self) -> torch.Tensor:
        return self.tokens.merged_weight()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.merged_weight(), self.base_layer.bias)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name == "base_layer":
                raise
            return getattr(self.base_layer, name)


def checked_indices(token_indices, vocab: int, what: str) -> List[int]:
    """token_indices as a list of distinct ints in [0, vocab); ValueError naming `what` otherwise."""
    if isinstance(token_indices, (str, bytes)) or not isinstance(token_indices, Iterable):
        raise ValueError(f"{what} must be a list of token ids, got {token_indices!r}")
    indices = list(token_indices)
    if not indices:
        raise ValueError(f"{what} is empty: give the ids of the tokens to train")
    bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab]
    if bad:
        raise ValueError(f"{what}: {bad[:5]} are not token ids of an embedding of {vocab} rows (ints in [0, {vocab}))")
    repeated = sorted({i for i in indices if indices.count(i) > 1})
    if repeated:
        raise ValueError(f"{what}: token ids {repeated[:5]} are given more than once")
    return indices


def input_embedding_path(model: nn.Module) -> Optional[str]:
    """The path of model.get_input_embeddings() (transformers'), or None where the model has none: what PEFT
    applies trainable_token_indices given as a list to."""
    try:
        embedding = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return next((n for n, m in model.named_modules() if m is embedding and embedding is not None), None)


def plan_trainable_tokens(model: nn.Module, spec: Union[Sequence[int], Mapping[str, Sequence[int]]], matches,
                          trained_whole: Sequence[str] = ()) -> Dict[str, List[int]]:
    """{embedding path: token ids} that spec selects, checked, without changing the model. spec: a list of ids
    (the model's input embedding, as in PEFT) or {module name: ids} (a path or its last components at a name
    boundary, matched by `matches`, as trained_whole: the modules_to_save names). ValueError for a name that
    selects no nn.Embedding or several, ids out of range or repeated, other ids for an embedding that already
    has trainable tokens, or an embedding trained whole."""
    from .modules_to_save import ModuleToSave

    if isinstance(spec, Mapping):
        chosen = {}
        for key, ids in spec.items():
            found = [n for n, m in model.named_modules()
                     if isinstance(m, (nn.Embedding, TrainableTokens, ModuleToSave)) and matches(n, [key])]
            if len(found) != 1:
                raise ValueError(f"trainable_token_indices: {key!r} selects {found or 'no embedding'}: name one "
                                 "nn.Embedding (its path, or its last components)")
            chosen[found[0]] = ids
    else:
        path = input_embedding_path(model)
        if path is None:
            raise ValueError("trainable_token_indices as a list needs a model with get_input_embeddings() (a "
                             "transformers model); give {module name: [ids]} instead")
        chosen = {path: spec}
    planned = {}
    for path, ids in chosen.items():
        module = model.get_submodule(path)
        if isinstance(module, ModuleToSave) or matches(path, list(trained_whole)):
            raise ValueError(f"{path} is trained whole (modules_to_save) and cannot also train some of its rows "
                             "(trainable_token_indices): leave it out of one of them")
        embedding = module.base_layer if isinstance(module, TrainableTokens) else module
        if not isinstance(embedding, nn.Embedding):
            raise ValueError(f"trainable_token_indices: {path} is a {type(embedding).__name__}, not an nn.Embedding")
        ids = checked_indices(ids, embedding.num_embeddings, f"trainable_token_indices for {path}")
        if isinstance(module, TrainableTokens):
            if module.indices() != ids:
                raise ValueError(f"{path} already trains tokens {module.indices()}, not {ids}")
        else:
            head = _output_embedding(model)
            sharing = [n for n, m in model.named_modules() if m is not embedding
                       and not (m is head and type(m) is nn.Linear)
                       and any(p is embedding.weight for p in m.parameters(recurse=False))]
            if sharing:
                raise ValueError(f"{path}'s weight is also {sharing[0]}'s (tied), which would not read the trained "
                                 "rows: the base of a LoRA-adapted LM head (which cannot be combined with trainable "
                                 "tokens), or the frozen original of an LM head trained whole (give modules_to_save and "
                                 "trainable_token_indices in one prepare_model call)")
        planned[path] = ids
    return planned


def tied_to(model: nn.Module, planned: Mapping[str, Sequence[int]], linears: Mapping[str, nn.Module]) -> list:
    """The layers of `linears` (those about to get LoRA adapters) whose weight is that of an embedding in
    `planned`: an adapter's base would compute with the embedding's rows as they were, not the trained ones."""
    weights = {id(model.get_submodule(p).weight) for p in planned}
    return [n for n, m in linears.items() if id(getattr(m, "weight", None)) in weights]


def head_trained_whole_and_tied(model: nn.Module, planned: Mapping[str, Sequence[int]], saved) -> Optional[str]:
    """The path of the model's LM head where it is tied to an embedding in `planned` and modules_to_save is about
    to train it whole (`saved(path)`), else None. (Computed consistently here: the trained copy has its own
    weight, untied; but PEFT 0.21 builds such a model and cannot run it. A head wrapped by an earlier call is
    refused by plan_trainable_tokens.)"""
    head = _output_embedding(model)
    if head is None or not any(model.get_submodule(p).weight is getattr(head, "weight", None) for p in planned):
        return None
    path = next(n for n, m in model.named_modules() if m is head)
    return path if saved(path) else None


def wrap_trainable_tokens(model: nn.Module, planned: Mapping[str, Sequence[int]]) -> None:
    """Wraps the embeddings of `planned` (plan_trainable_tokens' answer) in TrainableTokens, in place, and an LM
    head tied to one of them in TiedTokensHead. An embedding already wrapped stays as it is."""
    for path, ids in planned.items():
        module = model.get_submodule(path)
        if isinstance(module, TrainableTokens):
            continue
        tokens = TrainableTokens(module, ids)
        model.set_submodule(path, tokens)
        head = _output_embedding(model)
        if type(head) is nn.Linear and head.weight is module.weight:   # tied embeddings
            model.set_submodule(next(n for n, m in model.named_modules() if m is head), TiedTokensHead(head, tokens))


def _output_embedding(model: nn.Module):
    """The model's LM head (transformers' get_output_embeddings()), or None. (A head trained whole has its own
    weight; a LoRA-adapted one is not an nn.Linear: neither reads the trained rows.)"""
    try:
        return model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None


def unwrap_trainable_tokens(model: nn.Module) -> None:
    """Writes each TrainableTokens' trained rows into its embedding's weight and puts the embedding (and a tied
    head) back in its place, in place (merge_and_unload)."""
    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, TiedTokensHead)]:
        model.set_submodule(name, m.base_layer)
    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, TrainableTokens)]:
        weight = m.base_layer.weight
        with torch.no_grad():
            weight.index_copy_(0, m.token_indices, m.trainable_tokens_delta.to(weight.dtype))
        model.set_submodule(name, m.base_layer)
