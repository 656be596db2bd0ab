"""Modules trained whole beside the adapters, PEFT's `modules_to_save` (an LM head, the token embeddings): each is
wrapped in a ModuleToSave holding the frozen original and a trainable copy, so that `adapters_disabled` gives the
base model back and an export holds the trained copy only, as PEFT's ModulesToSaveWrapper does.

A copy of a module whose weight is tied to another's (SmolLM2's and Llama-3.2's LM head and embeddings share one
matrix) trains on its own: the tie is broken for training, as in PEFT, and merge_and_unload writes the model
untied (config.tie_word_embeddings = False) so that a reload does not tie the trained matrix away."""
from __future__ import annotations

import copy
import warnings
from typing import Iterable, List

from torch import nn


class ModuleToSave(nn.Module):
    """original_module (frozen) and trained_module (a trainable copy); forward runs the copy, or the original
    while `enabled` is False (adapters_disabled). Attributes it does not have (weight, num_embeddings, ...) are
    those of the module that runs."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.original_module = module
        self.trained_module = copy.deepcopy(module)
        for p in self.original_module.parameters():
            p.requires_grad_(False)
        for p in self.trained_module.parameters():
            p.requires_grad_(True)
        self.enabled = True

    def active(self) -> nn.Module:
        return self.trained_module if self.enabled else self.original_module

    def forward(self, *args, **kwargs):
        return self.active()(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)   # parameters, buffers and submodules of the wrapper itself
        except AttributeError:
            if name.startswith("_") or name in ("enabled", "original_module", "trained_module"):
                raise   # (a copy or unpickling asks before the wrapper's own attributes exist)
            return getattr(self.active(), name)


def matches(path: str, names: Iterable[str]) -> bool:
    """Whether module path `path` is one of `names`: a whole path, or its last components ("lm_head",
    "layers.0.mlp"), at a name boundary (PEFT matches the end of the name by characters: peft_io writes names
    it reads the same way)."""
    return any(path == n or path.endswith("." + n) for n in names)


def wrap_modules_to_save(model: nn.Module, names: Iterable[str], adapted: Iterable[str]) -> List[str]:
    """Wraps the modules of model that `names` select (see matches) in ModuleToSave, in place; returns their
    paths. A module already wrapped stays as it is. ValueError, before anything changes, for a name that selects
    nothing, or a module with LoRA adapters or quantized weights in it (`adapted`: the adapters' paths)."""
    from .bnb_io import is_bnb_linear_4bit, is_bnb_linear_8bit
    from .nn import Linear4bit, LoRALinear
    from .trainable_tokens import TiedTokensHead, TrainableTokens

    names, adapted = list(names), list(adapted)
    inside_wrapper = {n for n, m in model.named_modules() if isinstance(m, ModuleToSave)}
    chosen = [n for n, m in model.named_modules()
              if n and matches(n, names) and not any(n.startswith(w + ".") for w in inside_wrapper)]
    unknown = [t for t in names if not any(matches(n, [t]) for n in chosen)]
    if unknown:
        raise ValueError(f"modules_to_save {unknown} match no module of the model")
    chosen = [n for n in chosen if not any(n.startswith(c + ".") for c in chosen if c != n)]   # outermost only
    for name in chosen:
        module = model.get_submodule(name)
        if isinstance(module, ModuleToSave):
            continue
        inner = [f"{name}.{n}" if n else name for n, m in module.named_modules()
                 if isinstance(m, (LoRALinear, Linear4bit, ModuleToSave, TrainableTokens, TiedTokensHead))
                 or is_bnb_linear_4bit(m)
                 or is_bnb_linear_8bit(m)]
        inner += [a for a in adapted if a == name or a.startswith(name + ".")]
        if inner:
            raise ValueError(f"modules_to_save: {name} holds LoRA adapters, quantized weights, trainable tokens or a "
                             f"module trained whole already ({inner[0]}): a module is either adapted (target_modules, "
                             "trainable_token_indices) or trained whole (modules_to_save), once")
    owner = {}   # parameter -> the modules holding it (tied embeddings: two)
    for n, m in model.named_modules(remove_duplicate=False):
        for p in m.parameters(recurse=False):
            owner.setdefault(id(p), set()).add(n)
    shared = sorted({o for n in chosen for p in model.get_submodule(n).parameters() for o in owner[id(p)]
                     if o != n and not o.startswith(n + ".")})
    if shared:
        warnings.warn(f"modules_to_save: {chosen} share weights with {shared} (tied embeddings): each trained copy "
                      "is untied from the others, as in PEFT, and the merged model is saved untied", stacklevel=3)
    for name in chosen:
        module = model.get_submodule(name)
        if isinstance(module, ModuleToSave):
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, ModuleToSave(module))
    return chosen


def unwrap_trained(model: nn.Module) -> None:
    """Replaces each ModuleToSave of model by its trained copy (frozen), in place (merge_and_unload); where that
    unties the output embeddings from the input embeddings, the config says so."""
    from .save_4bit import embeddings_tied, untie_word_embeddings

    wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, ModuleToSave)]
    for name, module in wrapped:
        trained = module.trained_module
        for p in trained.parameters():
            p.requires_grad_(False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, trained)
    config = getattr(model, "config", None)
    if wrapped and hasattr(config, "get_text_config") and not embeddings_tied(model):
        untie_word_embeddings(config)
