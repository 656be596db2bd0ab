"""LoRA adapters in PEFT's on-disk format, both ways: a model prepared with qlora_ext.prepare_model saves its
adapters as a folder that `peft.PeftModel.from_pretrained(base_model, folder)` loads (and so every tool that
reads PEFT adapters: merging, serving), and loads such a folder written by PEFT to go on training it here.

The folder: adapter_config.json (PEFT's LoraConfig: peft_type LORA, r, lora_alpha, lora_dropout, target_modules,
bias "none") and adapter_model.safetensors with the tensors under PEFT's names: the adapter of the layer at
module path P of the model is "base_model.model.P.lora_A.weight" [r, in] and "...lora_B.weight" [out, r], the
same layouts and scaling (lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora) as LoRALinear's lora_A,
lora_B, alpha and use_rslora. Layers with their own r or alpha are written and read as PEFT's rank_pattern and
alpha_pattern (qlora_ext.lora_patterns), and modules trained whole (modules_to_save, qlora_ext.modules_to_save)
as PEFT's modules_to_save: their trained copy's tensors under the module's path ("base_model.model.P.weight"),
and embeddings with trainable tokens (qlora_ext.trainable_tokens) as PEFT's trainable_token_indices: the
trained rows as "base_model.model.P.token_adapter.trainable_tokens_delta" [tokens, hidden].
Only what both sides mean the same way is accepted: one dropout, one use_rslora and one use_dora (DoRA's
magnitudes: "...P.lora_magnitude_vector" [out]) for all layers, no trained biases.

The adapters were trained against the 4-bit base; PEFT users reproduce the training-time outputs by loading the
same base weights (for a dense base: the dequantized ones), and close to them with the original dense weights.
A model whose adapters started from LoftQ (prepare_model(init_lora_weights="loftq")) is written as what training
changed, s (B A - B0 A0), a rank-2r adapter (A stacked over A0, B beside -B0, lora_alpha doubled, or times
sqrt(2) with rsLoRA, so that s is unchanged up to rounding) for the original dense weights; LoftQ's own start,
which stands in for the quantization error, is not part of it. Such a model cannot load a PEFT adapter (its base
is not the weight the adapter was made for).
Needs safetensors (pip install safetensors); PEFT itself is not needed to write or read the folder.
"""
import json
import math
import os
from typing import Dict, List, Optional

import torch

from ._files import atomic_save_safetensors, atomic_write_text
from .lora_patterns import as_patterns, check_patterns, unique_ending, value_for
from .modules_to_save import ModuleToSave
from .trainable_tokens import TiedTokensHead, TrainableTokens, input_embedding_path
from .nn import Dropout, LoRALinear, lora_init_of, unwrap_model

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_TOKENS_SUFFIX = ".token_adapter.trainable_tokens_delta"   # trainable_token_indices' rows


# adapter_config.json keys that cannot change what the adapter computes, given the checks below (the others must
# be unset: biases in lora_B, layer replication, quantization-aware variants, new PEFT methods, ...)
_HARMLESS_KEYS = {
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
    "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out", "bias", "use_rslora",
    "use_dora", "modules_to_save", "init_lora_weights", "layers_to_transform", "layers_pattern", "rank_pattern",
    "alpha_pattern", "megatron_core", "runtime_config", "qalora_group_size", "eva_config", "trainable_token_indices",
}
# PEFT starts that leave the base weights alone; PiSSA, OLoRA, CorDA and LoftQ change them (the adapter then only
# fits the changed base, until PEFT converts it)
_PLAIN_INITS = (True, False, None, "gaussian", "orthogonal", "eva")


def _adapters(model: torch.nn.Module) -> Dict[str, LoRALinear]:
    adapters = {name: m for name, m in unwrap_model(model).named_modules() if isinstance(m, LoRALinear)}
    if not adapters:
        raise ValueError("the model has no LoRALinear layers: apply qlora_ext.prepare_model first")
    return adapters


def _modules_to_save(model: torch.nn.Module) -> Dict[str, ModuleToSave]:
    return {n: m for n, m in unwrap_model(model).named_modules() if isinstance(m, ModuleToSave)}


def _trainable_tokens(model: torch.nn.Module) -> Dict[str, TrainableTokens]:
    return {n: m for n, m in unwrap_model(model).named_modules() if isinstance(m, TrainableTokens)}


def _token_indices_config(model: torch.nn.Module, tokens: Dict[str, TrainableTokens]):
    """trainable_token_indices as PEFT reads it: a list for the input embedding alone (PEFT applies a list to
    get_input_embeddings()), else {full path: ids} (PEFT matches the keys as suffixes of the paths)."""
    if len(tokens) == 1 and next(iter(tokens)) == input_embedding_path(unwrap_model(model)):
        return next(iter(tokens.values())).indices()
    return {n: m.indices() for n, m in tokens.items()}


def _folder_tokens(model: torch.nn.Module, spec, where: str) -> Dict[str, list]:
    """{path in model: ids} of a folder's trainable_token_indices (PEFT's reading: a list is the input
    embedding's, a dict's keys are suffixes of module paths); ValueError for a key that names no embedding."""
    if spec is None:
        return {}
    inner = unwrap_model(model)
    if isinstance(spec, dict):
        out = {}
        heads = [n for n, m in inner.named_modules() if isinstance(m, TiedTokensHead)]
        for key, ids in spec.items():
            found = [n for n, m in inner.named_modules()
                     if isinstance(m, (TrainableTokens, torch.nn.Embedding)) and n.endswith(key)
                     and not n.endswith(".base_layer")]
            tied = [n for n in heads if n.endswith(key)]
            if not found and len(tied) == 1:   # PEFT's dict may name a tied head too: it reads the embedding's rows
                head = inner.get_submodule(tied[0])
                if list(ids) != head.tokens.indices():
                    raise ValueError(f"{where}: trainable_token_indices gives the tied {tied[0]} the rows {list(ids)}, "
                                     f"its embedding {head.tokens.indices()}")
                continue
            if len(found) != 1:
                raise ValueError(f"{where}: trainable_token_indices key {key!r} selects {found or 'no embedding'} "
                                 "of the model")
            out[found[0]] = list(ids)
        return out
    path = input_embedding_path(inner)
    if path is None:
        raise ValueError(f"{where}: trainable_token_indices as a list needs a model with get_input_embeddings()")
    return {path: list(spec)}


def _peft_paths(model: torch.nn.Module) -> list:
    """The module paths PEFT sees: the model's, with each modules_to_save wrapper standing for its original
    module (its trained copy left out)."""
    whole = _modules_to_save(model)
    paths = []
    for n, _ in unwrap_model(model).named_modules():
        w = next((w for w in whole if n.startswith(w + ".")), None)
        if w is None:
            paths.append(n)
        elif n[len(w) + 1:].split(".")[0] == "original_module" and n != f"{w}.original_module":
            paths.append(w + n[len(w) + len(".original_module"):])
    return [p for p in paths if p]


def _names_to_save(model: torch.nn.Module, whole) -> list:
    """modules_to_save as PEFT reads it: it trains every module whose path ends with one of the names (by
    characters: "norm" is also "input_layernorm"), so each path is written as its shortest ending of whole
    components, not starting with an index, that ends no other path."""
    paths = _peft_paths(model)
    return sorted(unique_ending(path, paths, by_characters=True) or path for path in whole)


def adapted_layers(tensor_names) -> List[str]:
    """The paths of the layers a PEFT folder holds adapters of, from its tensors' names."""
    return sorted({k[len(_PREFIX):].split(".lora_")[0] for k in tensor_names
                   if k.startswith(_PREFIX) and ".lora_" in k})


def modules_saved_whole(config: dict, tensor_names) -> List[str]:
    """The paths of the modules a PEFT folder holds trained whole (its modules_to_save), from its tensors' names:
    for each tensor that is no adapter's, the shortest start of its path that ends with one of the config's
    names. (PEFT 0.21 matched those names by characters, "norm" being every "*_layernorm" too, and later
    versions at a name boundary: the tensors say which modules it was.)"""
    names = config.get("modules_to_save") or []
    names = [names] if isinstance(names, str) else list(names)
    whole = set()
    for key in tensor_names:
        if not key.startswith(_PREFIX) or ".lora_" in key or key.endswith(_TOKENS_SUFFIX):
            continue
        parts = key[len(_PREFIX):].split(".")
        whole.add(next((".".join(parts[:i]) for i in range(1, len(parts))
                        if any(".".join(parts[:i]).endswith(n) for n in names)), ".".join(parts[:-1])))
    return sorted(whole)


def _one(values: dict, what: str):
    distinct = sorted(set(values.values()))
    if len(distinct) != 1:
        raise ValueError(f"PEFT's format has one {what} for all layers; the model's layers have {distinct}")
    return distinct[0]


def _target_modules(model: torch.nn.Module, names) -> list:
    """The layers' last name components when they select exactly these layers among all the model's modules
    (PEFT matches a target by that suffix, whatever the module's type), else the full module paths."""
    leaves = {n.split(".")[-1] for n in names}
    outside = {n for n in _peft_paths(model) if not any(n.startswith(a + ".") for a in names)}
    if {n for n in outside if n.split(".")[-1] in leaves} == set(names):
        return sorted(leaves)
    return sorted(names)


def _task_type(model: torch.nn.Module) -> Optional[str]:
    """CAUSAL_LM for a transformers causal LM (PEFT then builds its PeftModelForCausalLM, which generates), else
    none (PEFT's plain PeftModel, which any module can carry)."""
    return "CAUSAL_LM" if type(unwrap_model(model)).__name__.endswith("ForCausalLM") else None


_FROM_MODEL = "<the dense model the model was loaded from>"


def save_peft_adapter(model: torch.nn.Module, directory: str, base_model_name_or_path: Optional[str] = _FROM_MODEL,
                      dtype: torch.dtype = torch.float32) -> str:
    """Writes the model's LoRA adapters as a PEFT adapter folder (created if missing; each file written
    atomically). `base_model_name_or_path` goes into the config for PEFT's users (AutoPeftModelForCausalLM loads
    the base from it); by default the dense model the model was loaded from, as PEFT writes it: the folder
    (absolute) or hub name of transformers' name_or_path, and for a model from a save_4bit folder the dense model
    that folder records (PEFT cannot load a 4-bit checkpoint); None writes none. Returns the folder."""
    if base_model_name_or_path is _FROM_MODEL:
        from .save_4bit import source_of
        config = getattr(unwrap_model(model), "config", None)
        base_model_name_or_path = source_of(config) if config is not None else None
    adapters = _adapters(model)
    dropout = _one({n: a.dropout.p if isinstance(a.dropout, Dropout) else 0.0 for n, a in adapters.items()},
                   "lora_dropout")
    use_rslora = _one({n: a.use_rslora for n, a in adapters.items()}, "use_rslora")
    use_dora = _one({n: a.use_dora for n, a in adapters.items()}, "use_dora")
    from_start = lora_init_of(model) == "loftq"  # write what training changed only (never DoRA: prepare_model)
    tensors = {}
    for name, a in adapters.items():
        lora_A, lora_B = a.lora_A.detach(), a.lora_B.detach()
        if from_start:
            A0 = a.lora_A_init if a.lora_A_init is not None else torch.zeros_like(lora_A)
            B0 = a.lora_B_init if a.lora_B_init is not None else torch.zeros_like(lora_B)
            lora_A, lora_B = torch.cat([lora_A, A0.to(lora_A)]), torch.cat([lora_B, -B0.to(lora_B)], dim=1)
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = lora_A.to("cpu", dtype).contiguous()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = lora_B.to("cpu", dtype).contiguous()
        if use_dora:
            tensors[f"{_PREFIX}{name}.lora_magnitude_vector"] = a.lora_magnitude_vector.detach().to(
                "cpu", dtype).contiguous()
    whole = _modules_to_save(model)
    for name, m in whole.items():   # the trained copies, under the module's own path (PEFT drops its wrapper's)
        tensors.update({f"{_PREFIX}{name}.{k}": t.detach().to("cpu", dtype if t.is_floating_point() else t.dtype)
                        .contiguous() for k, t in m.trained_module.state_dict().items()})
    tokens = _trainable_tokens(model)
    for name, m in tokens.items():   # the trained rows, as PEFT's TrainableTokensWrapper holds them
        tensors[f"{_PREFIX}{name}{_TOKENS_SUFFIX}"] = m.trainable_tokens_delta.detach().to(
            "cpu", dtype).contiguous()
    # a LoftQ start's export is rank 2r: alpha grows with it so that the scaling stays
    rank_factor = 2 if from_start else 1
    alpha_factor = 1 if not from_start else math.sqrt(2) if use_rslora else 2
    paths = [n for n, _ in unwrap_model(model).named_modules()]
    r, rank_pattern = as_patterns({n: a.r * rank_factor for n, a in adapters.items()}, paths)
    alpha, alpha_pattern = as_patterns({n: float(a.alpha) * alpha_factor for n, a in adapters.items()}, paths)
    config = {
        "peft_type": "LORA", "task_type": _task_type(model), "base_model_name_or_path": base_model_name_or_path,
        "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": _target_modules(model, adapters),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": use_rslora, "use_dora": use_dora,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "modules_to_save": _names_to_save(model, whole) if whole else None,
        "trainable_token_indices": _token_indices_config(model, tokens) if tokens else None,
        "inference_mode": True, "init_lora_weights": True,
    }
    os.makedirs(directory, exist_ok=True)
    atomic_save_safetensors(tensors, os.path.join(directory, WEIGHTS_FILE), metadata={"format": "pt"})
    atomic_write_text(os.path.join(directory, CONFIG_FILE), json.dumps(config, indent=2) + "\n")
    return directory


def load_peft_adapter(model: torch.nn.Module, directory: str) -> None:
    """Copies a PEFT LoRA adapter folder's tensors into the model's LoRALinear layers (prepare the model with the
    same target modules, r, alpha, rank_pattern and alpha_pattern first). Anything that would not compute what
    PEFT computes is a ValueError naming it: another r or alpha for a layer, use_rslora or use_dora, fan_in_fan_out,
    trained biases, other modules_to_save, ensure_weight_tying, missing or extra tensors, other shapes."""
    from safetensors.torch import load_file

    config_path, weights_path = os.path.join(directory, CONFIG_FILE), os.path.join(directory, WEIGHTS_FILE)
    for path in (config_path, weights_path):
        if not os.path.exists(path):
            raise ValueError(f"{path} does not exist (a PEFT adapter folder has {CONFIG_FILE} and {WEIGHTS_FILE}; "
                             "older .bin adapters: load and save them once with PEFT to convert)")
    with open(config_path) as f:
        config = json.load(f)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{config_path}: peft_type must be 'LORA', got {config.get('peft_type')!r}")
    for key, ok in (("fan_in_fan_out", False), ("bias", "none")):
        if config.get(key, ok) != ok:
            raise ValueError(f"{config_path}: {key}={config[key]!r} is not supported (LoRALinear computes "
                             f"{key}={ok!r})")
    whole = _modules_to_save(model)
    from safetensors import safe_open
    with safe_open(weights_path, framework="pt") as f:
        selected = set(modules_saved_whole(config, f.keys()))
    if selected != set(whole):
        raise ValueError(f"{config_path}: modules_to_save={config.get('modules_to_save')!r} (the folder holds "
                         f"{sorted(selected) or 'no module'} trained whole), but the model trains "
                         f"{sorted(whole) or 'no module'} whole: prepare it with those modules "
                         "(prepare_model(modules_to_save=...), the trainer's --modules-to-save)")
    tokens = _trainable_tokens(model)
    folder_tokens = _folder_tokens(model, config.get("trainable_token_indices"), config_path)
    model_tokens = {n: m.indices() for n, m in tokens.items()}
    if folder_tokens != model_tokens:
        raise ValueError(f"{config_path}: trainable_token_indices={config.get('trainable_token_indices')!r} (rows "
                         f"{folder_tokens or 'none'}), but the model trains the rows {model_tokens or 'of none'}: "
                         "prepare it with those tokens (prepare_model(trainable_token_indices=...), the trainer's "
                         "--trainable-token-indices)")
    rank_pattern = check_patterns(config.get("rank_pattern"), f"{config_path}: rank_pattern", integer=True)
    alpha_pattern = check_patterns(config.get("alpha_pattern"), f"{config_path}: alpha_pattern", integer=False)
    for key, value in config.items():
        if key not in _HARMLESS_KEYS and value not in (None, False, 0, "", [], {}):
            raise ValueError(f"{config_path}: {key}={value!r} is not supported (it changes what the adapter "
                             "computes, or is newer than this reader)")
    if config.get("init_lora_weights", True) not in _PLAIN_INITS:
        raise ValueError(f"{config_path}: init_lora_weights={config['init_lora_weights']!r} changes the base weights "
                         "the adapter was trained against; convert it to a plain LoRA adapter with PEFT first "
                         "(save_pretrained(..., path_initial_model_for_weight_conversion=...))")
    adapters = _adapters(model)
    for name, a in adapters.items():
        if a.lora_A_init is not None:
            raise ValueError(f"layer {name} was prepared with init_lora_weights='loftq': its base is quantized from "
                             "the weight less LoftQ's start, not the weight a PEFT adapter is made for; prepare the "
                             "model with the default init to load one")
        use_rslora, use_dora = bool(config.get("use_rslora") or False), bool(config.get("use_dora") or False)
        r, alpha = value_for(rank_pattern, name, config["r"]), value_for(alpha_pattern, name, config["lora_alpha"])
        if (a.r, float(a.alpha), a.use_rslora, a.use_dora) != (r, float(alpha), use_rslora, use_dora):
            raise ValueError(f"{config_path}: the adapter has r={r}, lora_alpha={alpha}, use_rslora={use_rslora}, "
                             f"use_dora={use_dora} for layer {name}, but the model's layer has r={a.r}, alpha="
                             f"{a.alpha}, use_rslora={a.use_rslora}, use_dora={a.use_dora}: prepare the model with "
                             "the adapter's settings (prepare_model(r=..., alpha=..., use_rslora=..., use_dora=..., "
                             "rank_pattern=..., alpha_pattern=...), or the trainer's --r, --alpha, --use-rslora, "
                             "--use-dora, --rank-pattern, --alpha-pattern)")
    tensors = load_file(weights_path)
    wanted = {f"{_PREFIX}{n}.lora_{ab}.weight": getattr(a, "lora_" + ab) for n, a in adapters.items() for ab in "AB"}
    wanted.update({f"{_PREFIX}{n}.lora_magnitude_vector": a.lora_magnitude_vector
                   for n, a in adapters.items() if a.use_dora})
    wanted.update({f"{_PREFIX}{n}.{k}": t for n, m in whole.items()
                   for k, t in m.trained_module.state_dict(keep_vars=True).items()})
    wanted.update({f"{_PREFIX}{n}{_TOKENS_SUFFIX}": m.trainable_tokens_delta
                   for n, m in tokens.items()})
    missing, extra = sorted(set(wanted) - set(tensors)), sorted(set(tensors) - set(wanted))
    if missing or extra:
        raise ValueError(f"{weights_path} does not fit the model: {len(missing)} missing tensor(s) {missing[:2]}, "
                         f"{len(extra)} extra {extra[:2]} (were the same target modules used?)")
    with torch.no_grad():
        for key, param in wanted.items():
            if tensors[key].shape != param.shape:
                raise ValueError(f"{weights_path}: {key} has shape {tuple(tensors[key].shape)}, the model's "
                                 f"{tuple(param.shape)}")
            param.copy_(tensors[key])
