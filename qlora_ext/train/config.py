"""The run configuration (one dataclass: every flag of `qlora-train`, its default and its meaning) and
its checks. A run saves it as JSON beside its adapters, and --resume reads it back."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from typing import Dict, List, Optional

from .._files import atomic_write_text
from ..loftq import LOFTQ_SVDS
from ..lora_patterns import check_patterns
from .flags import BoolFlag

DEFAULT_MODEL = "smollm2"          # the embedded SmolLM2-135M-Instruct (see qlora_ext.train.model)
QUANT_TYPES = ("nf4", "fp4", "int4", "none")
SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "paged_adamw", "paged_adamw8bit")
LINEAR_BACKENDS = ("auto", "fused", "fused_mma", "dequant", "tune")
LORA_INITS = ("default", "loftq")
LOAD_IN_4BIT = ("auto", "on", "off")
PACKINGS = ("auto", "wrapped", "bfd")
REPORT_TO = ("none", "tensorboard")

# Fields added after runs were first saved, with the value that reproduces a run saved before them: a run whose
# config.json lacks the key continues (--resume, merge, generate) as it began.
LEGACY_DEFAULTS = {"packing": "wrapped", "add_bos": False}


class ConfigError(ValueError):
    """A bad flag or input: the CLI prints its message (no traceback) and exits with status 2."""


@dataclasses.dataclass
class TrainConfig:
    # what to train
    model: str = DEFAULT_MODEL          # a local Hugging Face model directory, or "smollm2" (embedded default)
    data: List[str] = dataclasses.field(default_factory=list)  # text, record files, folders; none: Shakespeare
    output_dir: str = "runs/qlora"      # adapters, checkpoints and the report go here
    # quantization and LoRA
    quant_type: str = "nf4"             # nf4 | fp4 | int4 | none (16-bit LoRA on a dense base)
    double_quant: bool = True           # quantize the absmax constants too (FP8): 4.127 instead of 4.5 bits/param
    blocksize: int = 64                 # weights per absmax (64, 128 or 256)
    r: int = 16                         # LoRA rank
    alpha: float = 32.0                 # LoRA alpha: the adapters are scaled by alpha / r
    dropout: float = 0.05               # LoRA dropout on the adapters' input
    use_rslora: bool = False            # rsLoRA: scale the adapters by alpha / sqrt(r), not alpha / r (PEFT's)
    use_dora: bool = False              # DoRA: a trained magnitude per output row (PEFT's use_dora)
    rank_pattern: Dict[str, int] = dataclasses.field(default_factory=dict)     # JSON: r of the layers a key selects
    alpha_pattern: Dict[str, float] = dataclasses.field(default_factory=dict)  # JSON: alpha of the layers a key selects
    target_modules: Optional[List[str]] = None   # default (or all-linear): every nn.Linear except lm_head
    modules_to_save: Optional[List[str]] = None  # modules trained whole beside the adapters (PEFT's), e.g. lm_head
    trainable_token_indices: Optional[List[str]] = None  # train these input-embedding rows alone: ids or tokens
    init_lora_weights: str = "default"  # default (A Kaiming, B zero) | loftq (start at each layer's quantization error)
    loftq_iters: int = 1                # LoftQ's quantize / SVD alternations (with --init-lora-weights loftq)
    loftq_svd: str = "exact"            # exact | randomized (LoftQ's truncated SVD; randomized: 30-80x faster)
    init_adapter: Optional[str] = None  # start from a PEFT LoRA adapter folder (e.g. an earlier run's peft_adapter)
    chat_template: Optional[str] = None  # the run's chat template: a .jinja file, tokenizer folder, chatml, or its text
    load_in_4bit: str = "auto"          # quantize as the checkpoint is read (no dense model held): auto (GPU)|on|off
    # data
    seq_len: int = 256                  # tokens per block
    eval_blocks: int = 32               # held-out blocks of seq_len tokens (never trained on)
    eval_data: List[str] = dataclasses.field(default_factory=list)  # held-out files, all blocks (not --eval-blocks)
    max_tokens: int = 0                 # use only the first N tokens of the text (0: all of it)
    packing: str = "auto"               # wrapped (a stream cut in blocks) | bfd (whole examples) | auto (bfd: records)
    add_bos: bool = True                # start texts and non-chat examples with the tokenizer's BOS (as tokenizer())
    num_proc: int = 0                   # processes tokenizing large record files (0: one per CPU core; same result)
    # optimization
    batch_size: int = 4                 # blocks per micro-batch
    grad_accum: int = 1                 # micro-batches per optimizer step
    steps: int = 200                    # optimizer steps
    epochs: float = 0.0                 # passes over the train blocks; sets --steps (0: --steps says)
    lr: float = 2e-4                    # peak learning rate
    warmup_steps: int = 10              # steps of linear warmup to --lr
    schedule: str = "cosine"            # cosine | linear (toward 0 at the last step) | constant, after warmup
    weight_decay: float = 0.0           # AdamW's decoupled weight decay
    max_grad_norm: float = 1.0          # 0 disables clipping
    optimizer: str = "paged_adamw"      # paged_adamw | paged_adamw8bit (qlora_ext.PagedAdamW[8bit]) | adamw (torch)
    gradient_checkpointing: bool = True
    neftune_noise_alpha: float = 0.0    # NEFTune: noise of alpha / sqrt(L d) on the input embeddings in training
    seed: int = 0                       # seeds the adapters, dropout, data order and held-out split
    # bookkeeping
    eval_every: int = 50                # steps between evaluations (and one before training, one at the end)
    save_every: int = 50                # steps between resumable checkpoints (and one at the end)
    save_total_limit: int = 0           # keep only the newest N checkpoints (0: all of them)
    load_best_model_at_end: bool = False   # end with the adapters of the lowest eval loss, not the last step's
    early_stopping_patience: int = 0    # stop after N evals in a row without a lower eval loss (0: never)
    early_stopping_threshold: float = 0.0  # the least drop of the eval loss that counts for early stopping
    device: str = "auto"                # auto: cuda when available, else cpu
    linear_backend: str = "auto"        # CUDA 4-bit GEMMs: auto | fused | fused_mma | dequant | tune (see README)
    resume: bool = False                # continue the run in output_dir from its latest checkpoint
    overwrite_output_dir: bool = False  # start a new run in an output_dir holding another (its files removed)
    progress: bool = True               # the tqdm bar
    report_to: str = "none"             # none | tensorboard: the live log (train_log.jsonl) as TensorBoard events too

    def validate(self) -> "TrainConfig":
        def need(ok, msg):
            if not ok:
                raise ConfigError(msg)
        need(self.quant_type in QUANT_TYPES, f"--quant-type must be one of {QUANT_TYPES}, got {self.quant_type!r}")
        need(self.schedule in SCHEDULES, f"--schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        need(self.optimizer in OPTIMIZERS, f"--optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        need(self.blocksize in (64, 128, 256), f"--blocksize must be 64, 128 or 256, got {self.blocksize}")
        need(self.init_lora_weights in LORA_INITS,
             f"--init-lora-weights must be one of {LORA_INITS}, got {self.init_lora_weights!r}")
        need(self.loftq_svd in LOFTQ_SVDS, f"--loftq-svd must be one of {LOFTQ_SVDS}, got {self.loftq_svd!r}")
        need(self.packing in PACKINGS, f"--packing must be one of {PACKINGS}, got {self.packing!r}")
        need(self.report_to in REPORT_TO, f"--report-to must be one of {REPORT_TO}, got {self.report_to!r}")
        need(self.load_in_4bit in LOAD_IN_4BIT,
             f"--load-in-4bit must be one of {LOAD_IN_4BIT}, got {self.load_in_4bit!r}")
        need(self.load_in_4bit != "on" or self.quant_type != "none",
             "--load-in-4bit on needs a quantized base: --quant-type none keeps the dense weights")
        need(self.load_in_4bit != "on" or self.init_lora_weights != "loftq",
             "--load-in-4bit on cannot start LoftQ, which needs each layer's dense weight")
        need(self.init_lora_weights != "loftq" or not self.use_dora,
             "--init-lora-weights loftq cannot start DoRA layers (--use-dora): DoRA starts at B = 0")
        need(self.init_lora_weights != "loftq" or self.quant_type != "none",
             "--init-lora-weights loftq needs a quantized base (--quant-type nf4, fp4 or int4)")
        need(self.init_adapter is None or self.resume or os.path.isdir(self.init_adapter),  # resume: checkpoint's
             f"--init-adapter {self.init_adapter} is not a folder (a PEFT adapter folder: adapter_config.json and "
             "adapter_model.safetensors)")
        need(self.init_adapter is None or self.init_lora_weights == "default",
             "--init-adapter starts the adapters from the folder: it cannot be combined with --init-lora-weights "
             f"{self.init_lora_weights}")
        for name in ("r", "seq_len", "batch_size", "grad_accum", "steps", "eval_blocks", "eval_every",
                     "save_every", "loftq_iters"):
            need(getattr(self, name) > 0, f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        need(self.seq_len >= 2, f"--seq-len must be at least 2 (a block's first token predicts the second), got "
                                f"{self.seq_len}")
        for name in ("warmup_steps", "max_tokens", "weight_decay", "max_grad_norm", "epochs", "num_proc",
                     "neftune_noise_alpha", "save_total_limit", "early_stopping_patience",
                     "early_stopping_threshold"):
            need(getattr(self, name) >= 0, f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            need(not isinstance(value, float) or math.isfinite(value), f"{_flag(f.name)} must be finite, got {value}")
        need(self.lr > 0, f"--lr must be positive, got {self.lr}")
        need(self.alpha != 0, "--alpha must not be 0: the adapters would be scaled by 0 and training would change "
                              "nothing")
        for name in ("target_modules", "modules_to_save", "trainable_token_indices"):
            need(getattr(self, name) != [], f"{_flag(name)} is empty: name at least one, or leave the flag out")
        need(0 <= self.dropout < 1, f"--dropout must be in [0, 1), got {self.dropout}")
        need(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
             f"--device must be auto, cpu or cuda[:N], got {self.device!r}")
        need(self.linear_backend in LINEAR_BACKENDS,
             f"--linear-backend must be one of {LINEAR_BACKENDS}, got {self.linear_backend!r}")
        for name in ("rank_pattern", "alpha_pattern"):
            try:
                check_patterns(getattr(self, name), _flag(name), integer=name == "rank_pattern")
            except ValueError as e:
                raise ConfigError(str(e)) from e
        for name in PATH_FIELDS:   # absolute: the saved run is found from any working directory
            if getattr(self, name) != DEFAULT_MODEL:
                setattr(self, name, _absolute(getattr(self, name)))
        from .chat_template import resolve_chat_template
        # The config keeps the template's text (a name or path is read here), so the saved run renders without the file.
        self.chat_template = resolve_chat_template(self.chat_template)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}")
        return cls(**{**{k: v for k, v in LEGACY_DEFAULTS.items() if k not in d}, **d})

    def save(self, path: str) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")


# Presets: the demo must finish in <= 10 minutes on a 2-core CPU (measured: see README).
# (The demo starts over in its folder when run again, --resume aside.)
DEMO_OVERRIDES = dict(seq_len=128, batch_size=4, steps=60, warmup_steps=6, lr=3e-4, eval_blocks=24,
                      eval_every=30, save_every=30, output_dir="runs/demo", overwrite_output_dir=True)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# The same settings under the names of transformers' TrainingArguments and artidoro/qlora's qlora.py, so that their
# commands carry over (their underscore spellings too: flags.Parser). Only where the meaning is the same: HF's
# --lr_scheduler_type constant has no warmup, --schedule constant has --warmup-steps, so it is not one of them.
HF_ALIASES = {"model": "--model-name-or-path", "lr": "--learning-rate", "steps": "--max-steps",
              "epochs": "--num-train-epochs", "batch_size": "--per-device-train-batch-size",
              "grad_accum": "--gradient-accumulation-steps", "eval_every": "--eval-steps",
              "save_every": "--save-steps", "r": "--lora-r", "alpha": "--lora-alpha", "dropout": "--lora-dropout"}


def add_arguments(p: argparse.ArgumentParser, defaults: Optional[dict] = None) -> None:
    """One flag per TrainConfig field (booleans: flags.BoolFlag), help text from the field's comment; HF_ALIASES
    name some twice."""
    defaults = defaults or {}
    helps = _field_help()
    for f in dataclasses.fields(TrainConfig):
        default = defaults.get(f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory())
        h = helps.get(f.name, "")
        flags = (_flag(f.name),) + ((HF_ALIASES[f.name],) if f.name in HF_ALIASES else ())
        if f.type in ("bool", bool):
            p.add_argument(*flags, dest=f.name, action=BoolFlag, default=default,
                           help=f"{h} (default: {default})")
        elif f.name in ("rank_pattern", "alpha_pattern"):
            example = '{"q_proj": 64, "model.layers.0.mlp.down_proj": 8}' if f.name == "rank_pattern" else \
                '{"q_proj": 128}'
            p.add_argument(_flag(f.name), dest=f.name, type=_json_object, default=default,
                           help=f"{h}, e.g. '{example}': regular expressions matched against the end of each "
                                f"layer's module path, the first match wins (PEFT's {f.name}) (default: none)")
        elif f.name in ("data", "eval_data", "target_modules", "modules_to_save", "trainable_token_indices"):
            files = f.name in ("data", "eval_data")
            shown = default or {"eval_data": "--eval-blocks of --data", "modules_to_save": "none",
                                "trainable_token_indices": "none"}.get(f.name, "see above")
            p.add_argument(*flags, dest=f.name, nargs="+" if files else None,
                           default=default, type=str if files else _comma_list,
                           help=f"{h} (default: {shown})" + ("" if files else "; comma-separated"))
        else:
            typ = {"int": int, "float": float, "str": str, "Optional[str]": str}[str(f.type).split(".")[-1].strip("'")]
            p.add_argument(*flags, dest=f.name, type=typ, default=default, help=f"{h} (default: {default})")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}).validate()


def _json_object(s: str) -> dict:
    try:
        value = json.loads(s)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e}): give an object such as '{{\"q_proj\": 64}}'") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object (pattern -> value), got {s!r}")
    return value


def _comma_list(s: str) -> List[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _field_help() -> dict:
    """The trailing comment of each field above, as its --help text (one place says what a flag means)."""
    import inspect
    out = {}
    for line in inspect.getsource(TrainConfig).splitlines():
        line = line.strip()
        if ":" in line and "#" in line and not line.startswith("#"):
            name = line.split(":")[0].strip()
            out[name] = line.split("#", 1)[1].strip()
    return out


# What a PEFT adapter folder's adapter_config.json says about the adapters it holds, by TrainConfig field (the
# layers adapted and trained whole come from its tensors' names instead).
ADAPTER_SETTINGS = {"r": "r", "alpha": "lora_alpha", "use_rslora": "use_rslora", "use_dora": "use_dora",
                    "rank_pattern": "rank_pattern", "alpha_pattern": "alpha_pattern"}


def _token_indices_setting(value) -> Optional[List[str]]:
    """A PEFT folder's trainable_token_indices as --trainable-token-indices (the input embedding's ids: a list,
    or a dict naming one embedding, or it and a head tied to it with the same ids), else None (several
    embeddings with their own ids: the command line cannot say that)."""
    if isinstance(value, dict) and value and all(v == next(iter(value.values())) for v in value.values()):
        value = next(iter(value.values()))
    if isinstance(value, list) and value and all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        return [str(i) for i in value]
    return None


def with_init_adapter_settings(cfg: TrainConfig, given: dict) -> tuple:
    """(cfg with the adapter settings of its --init-adapter folder where the command line (`given`) has none, the
    names of those taken), so that the folder alone says what the adapters are. r, alpha, rsLoRA, DoRA and the
    patterns and the trainable token rows come from adapter_config.json; the layers adapted and those trained whole (modules_to_save) from the
    tensors' names, as full module paths: whatever way the folder selected them (suffixes, a regular expression,
    layers_to_transform, PEFT's character-suffix modules_to_save), those are the layers it holds. (The command
    line's business: the Python API takes a TrainConfig as given.)"""
    if not cfg.init_adapter or cfg.resume:
        return cfg, []
    from safetensors import safe_open

    from ..peft_io import adapted_layers, modules_saved_whole
    path = os.path.join(cfg.init_adapter, "adapter_config.json")
    try:
        with open(path) as f:
            saved = json.load(f)
        if not isinstance(saved, dict):
            raise ValueError(f"a JSON object expected, got {type(saved).__name__}")
        with safe_open(os.path.join(cfg.init_adapter, "adapter_model.safetensors"), framework="pt") as f:
            keys = list(f.keys())
    except Exception as e:  # OSError, JSON errors, safetensors' errors
        raise ConfigError(f"--init-adapter {cfg.init_adapter}: cannot read its adapter_config.json and "
                          f"adapter_model.safetensors: {e}") from e
    found = {field: saved.get(key) for field, key in ADAPTER_SETTINGS.items()}
    found["target_modules"] = adapted_layers(keys) or None
    found["modules_to_save"] = modules_saved_whole(saved, keys) or None
    found["trainable_token_indices"] = _token_indices_setting(saved.get("trainable_token_indices"))
    taken = {field: value for field, value in found.items()
             if field not in given and value is not None and value != getattr(cfg, field)}
    return dataclasses.replace(cfg, **taken).validate(), sorted(taken)


def as_command_line(cfg: TrainConfig, names) -> str:
    """The flags `names` of cfg as a command line would give them (a long list as its length)."""
    out = []
    for name in names:
        value = getattr(cfg, name)
        if isinstance(value, bool):
            out.append(_flag(name) if value else "--no-" + _flag(name)[2:])
        elif isinstance(value, list):
            out.append(f"{_flag(name)} {','.join(value)}" if len(value) <= 4 else
                       f"{_flag(name)} ({len(value)} names)")
        elif isinstance(value, dict):
            out.append(f"{_flag(name)} '{json.dumps(value)}'")
        else:
            out.append(f"{_flag(name)} {value}")
    return " ".join(out)


# Flags that may differ on --resume: they do not change what is computed.
# (load_in_4bit builds the same 4-bit base as loading the dense model and quantizing it, bit for bit.)
RESUME_MAY_CHANGE = ("resume", "progress", "device", "linear_backend", "output_dir", "load_in_4bit", "num_proc",
                     "report_to", "save_total_limit", "overwrite_output_dir")
# Flags that may differ on --resume and are then the run's from there on (config.json records them): when to
# checkpoint, and when to evaluate where no decision (best model, early stopping) rests on the evals. Neither
# changes the training (an eval draws no random numbers and leaves the model as it was; tested bit for bit).
RESUME_RESCHEDULES = ("save_every", "eval_every")
# Flags naming files or folders: kept absolute (so eval, merge, generate and --resume work from anywhere) and
# compared on --resume as the paths they name.
PATH_FIELDS = ("model", "data", "eval_data", "init_adapter")


def _difference(saved, given, limit: int = 120) -> str:
    """"saved X, given Y"; two long texts (chat templates) from the first character where they differ."""
    if isinstance(saved, str) and isinstance(given, str) and max(len(saved), len(given)) > limit:
        at = next((i for i, (a, b) in enumerate(zip(saved, given)) if a != b), min(len(saved), len(given)))
        start = max(0, at - 20)
        return (f"{len(saved)} and {len(given)} characters, differing from character {at}: saved "
                f"...{saved[start:start + 60]!r}, given ...{given[start:start + 60]!r}")
    return f"saved {saved!r}, given {given!r}"


def _listed(value) -> list:
    return value if isinstance(value, list) else [value]


def _absolute(value):
    """A path flag's value with each path that exists made absolute (a name such as "smollm2" stays)."""
    if isinstance(value, list):
        return [_absolute(v) for v in value]
    return os.path.abspath(value) if isinstance(value, str) and value and os.path.exists(value) else value


def _ordered(name: str, value):
    """A flag's value as compared on --resume: a mapping's order counts (the first pattern that matches wins), a
    module list's does not (the files' order does: it orders the data); paths as the files they name."""
    if name in PATH_FIELDS:
        value = _absolute(value)
        return [os.path.realpath(v) for v in value] if isinstance(value, list) else (
            os.path.realpath(value) if isinstance(value, str) and os.path.isabs(value) else value)
    if isinstance(value, dict):
        return list(value.items())
    return sorted(value) if name in ("target_modules", "modules_to_save") and isinstance(value, list) else value


def resume_config(output_dir: str, explicit: dict) -> TrainConfig:
    """The saved config of the run in output_dir, with `resume` on. Flags given explicitly on the command
    line must agree with it (except RESUME_MAY_CHANGE): a resumed run is the same run, continued."""
    path = os.path.join(output_dir, "config.json")
    if not os.path.exists(path):
        raise ConfigError(f"--resume: {path} does not exist (no run to resume in {output_dir!r})")
    try:
        with open(path) as f:
            saved = TrainConfig.from_dict(json.load(f))
    except (OSError, ValueError, TypeError) as e:   # (ConfigError is a ValueError: unknown keys say so)
        raise ConfigError(f"--resume: {path} is not a run's config ({e})") from e
    if explicit.get("chat_template") is not None:   # a path or name given again: compare what it holds
        from .chat_template import resolve_chat_template
        explicit = dict(explicit, chat_template=resolve_chat_template(explicit["chat_template"]))
    changed = {k: (getattr(saved, k), v) for k, v in explicit.items()
               if k not in RESUME_MAY_CHANGE and _ordered(k, getattr(saved, k)) != _ordered(k, v)}
    # The longer run is the one given those steps from the start where the learning rate does not depend on
    # them and no decision was taken on the last step's eval (best model, patience) that the longer run lacks.
    end_eval = (saved.load_best_model_at_end or saved.early_stopping_patience) and saved.steps % saved.eval_every
    why = ("decays over its --steps" if saved.schedule != "constant" else "was set by --epochs" if saved.epochs
           else "ends with an eval that best-model and early-stopping decisions took, which a run given the steps "
                "from the start does not make (--steps not a multiple of --eval-every)" if end_eval else None)
    extended = "steps" in changed and why is None
    if "steps" in changed and not extended:
        raise ConfigError(f"--resume: --steps ({_difference(*changed['steps'])}) can change only under --schedule "
                          f"constant set by --steps: this run {why}, so another count would be another run; start a "
                          "new one (--init-adapter <this run>/peft_adapter continues from its adapters)")
    if extended:   # (a constant learning rate: more steps continue the same run)
        changed.pop("steps")
    if "eval_every" in changed and (saved.load_best_model_at_end or saved.early_stopping_patience):
        raise ConfigError(f"--resume: --eval-every ({_difference(*changed['eval_every'])}) cannot change in a run "
                          "whose evals decide " + ("the best model" if saved.load_best_model_at_end else
                                                   "when to stop early") + ": other evals would be another run")
    rescheduled = [k for k in RESUME_RESCHEDULES if changed.pop(k, None) is not None]
    if changed:
        relative = [k for k in changed if k in PATH_FIELDS and any(
            isinstance(v, str) and v != DEFAULT_MODEL and not os.path.isabs(v) for v in _listed(getattr(saved, k)))]
        raise ConfigError("--resume continues the saved run; these flags differ from it: " + ", ".join(
            f"{_flag(k)} ({_difference(a, b)})" for k, (a, b) in changed.items()) + (
            f" ({', '.join(map(_flag, relative))} saved relative to where the run began, by a version that did not "
            "keep paths absolute: resume from there)" if relative else ""))
    keep = {k: explicit[k] for k in (*RESUME_MAY_CHANGE, *rescheduled, *(("steps",) if extended else ()))
            if k in explicit and k != "resume"}
    return dataclasses.replace(saved, **keep, resume=True).validate()
