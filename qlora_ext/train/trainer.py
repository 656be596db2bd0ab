"""The training loop: load, quantize and wrap the model, then train the LoRA adapters with gradient
accumulation, clipping, warmup + cosine/linear/constant schedule and gradient checkpointing; evaluate, save
resumable checkpoints, and return the run's numbers for the report.

bf16 autocast on CUDA (base weights bf16, adapters and optimizer states fp32; modules trained whole keep the
model's dtype, as in PEFT); plain fp32 on the CPU.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import importlib
import json
import math
import os
import random
import resource
import time
from typing import Callable, Dict, Optional, Tuple

import torch

from .. import model_summary, prepare_model, set_linear_backend
from ..bnb_io import holds_bnb_linear_4bit
from ..load_4bit import is_4bit_checkpoint, load_4bit_problem
from ..nn import Linear4bit
from ..peft_io import load_peft_adapter, save_peft_adapter
from ..save_4bit import checkpoint_source, checkpoint_spec
from ..trainable_tokens import TrainableTokens
from . import checkpoint as ckpt
from .best_eval import (best_adapter_path, for_checkpoint, observe_eval, restore_from_checkpoint,
                        save_best_adapters, saved_best_step)
from .chat_template import use_chat_template
from .config import RESUME_RESCHEDULES, ConfigError, TrainConfig
from .data import IGNORE, TokenBlocks, batch_indices, find_text_files, resolve_packing, run_blocks
from .loss import causal_lm_loss, packed_attention_problem, vocab_size
from .model import load_model_and_tokenizer, max_positions, resolve_model_dir, token_ids
from .neftune import input_embeddings, neftune
from .output_dir import PEFT_DIR, check_output_dir, clear_previous_run, own_paths
from .run_log import RunLog, summary_writer_class


def record_resumed_settings(cfg: TrainConfig, state: dict) -> None:
    """A resumed run given more --steps (a constant schedule: resume_config allows it) or another --save-every or
    --eval-every (RESUME_RESCHEDULES) records them in its config.json, so a later --resume, eval or merge knows
    them (nothing else it was resumed with). A run whose patience ran out (stopped early, or at its last eval)
    refuses more steps: a run given the steps from the start stops there."""
    path = os.path.join(cfg.output_dir, ckpt.CONFIG_FILE)
    with open(path) as f:
        saved = TrainConfig.from_dict(json.load(f))
    now = {k: getattr(cfg, k) for k in ("steps", *RESUME_RESCHEDULES) if getattr(saved, k) != getattr(cfg, k)}
    if not now:
        return
    out_of_patience = cfg.early_stopping_patience and \
        state.get("evals_without_improvement", 0) >= cfg.early_stopping_patience
    if "steps" in now and (state.get("stopped_early_at") is not None or out_of_patience):
        raise ConfigError(f"--resume: the run's patience ran out (--early-stopping-patience "
                          f"{cfg.early_stopping_patience}): --steps {cfg.steps} would train nothing more")
    dataclasses.replace(saved, **now).save(path)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA GPU is visible")
    return torch.device(name)


def make_optimizer(name: str, params, lr: float, weight_decay: float, embeddings=()) -> torch.optim.Optimizer:
    """torch.optim.AdamW, or qlora_ext.optim.PagedAdamW / PagedAdamW8bit (imported only when asked for).
    embeddings: trained token-embedding weights, which keep float32 states in PagedAdamW8bit (as Hugging Face's
    Trainer keeps them at 32 bits with bitsandbytes' 8-bit optimizers)."""
    kwargs = dict(lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    classes = {"paged_adamw": "PagedAdamW", "paged_adamw8bit": "PagedAdamW8bit"}
    if name in classes:
        try:
            # import_module, not `from .. import optim`: that would take the package attribute and miss a
            # module blocked or missing in sys.modules (as in a build without the optimizer)
            optim = importlib.import_module("qlora_ext.optim")
            cls = getattr(optim, classes[name])
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"--optimizer {name} needs qlora_ext.optim.{classes[name]}, which this build of "
                              f"qlora_ext does not have ({e}); use --optimizer adamw") from e
        if name == "paged_adamw8bit":
            kwargs["float_state_params"] = list(embeddings)
        return cls(params, **kwargs)
    raise ConfigError(f"unknown optimizer {name!r}")


def compute_dtype_for(device: torch.device) -> Optional[torch.dtype]:
    """The 4-bit layers' compute dtype in a run: bfloat16 on a GPU, x's own (float32) on the CPU."""
    return torch.bfloat16 if device.type == "cuda" else None


def prepare_for_run(model: torch.nn.Module, cfg: TrainConfig, device: torch.device, tokenizer=None) -> None:
    """prepare_model with the run's settings (the trainer, and `qlora-train merge` rebuilding a run's model);
    the tokenizer gives --trainable-token-indices' tokens their ids."""
    tokens = None
    if cfg.trainable_token_indices:
        if tokenizer is None:
            raise ValueError("prepare_for_run: --trainable-token-indices needs the run's tokenizer")
        tokens = token_ids(tokenizer, cfg.trainable_token_indices)
    try:
        prepare_model(model, target_modules=cfg.target_modules, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout,
                      quant_type=cfg.quant_type, double_quant=cfg.double_quant, blocksize=cfg.blocksize,
                      compute_dtype=compute_dtype_for(device),
                      init_lora_weights=cfg.init_lora_weights, loftq_iters=cfg.loftq_iters, loftq_svd=cfg.loftq_svd,
                      use_rslora=cfg.use_rslora, use_dora=cfg.use_dora, rank_pattern=cfg.rank_pattern,
                      alpha_pattern=cfg.alpha_pattern, modules_to_save=cfg.modules_to_save,
                      trainable_token_indices=tokens)
    except ValueError as e:   # unknown target module, a layer that cannot be taken over, ...
        raise ConfigError(f"cannot prepare the model: {e}") from e


def resolve_load_in_4bit(cfg: TrainConfig, device: torch.device, model_dir: str, auto_on_cpu: bool = False) -> bool:
    """Whether the run quantizes its base as the checkpoint is read (qlora_ext.load_4bit) rather than loading the
    dense model first: --load-in-4bit on (an error where it cannot), off, or auto: on a GPU wherever it can
    (on the CPU the dense model is loaded, and its eval loss reported beside the quantized one's), and on the
    CPU too with auto_on_cpu (a rebuilt run, which reports nothing)."""
    if is_4bit_checkpoint(model_dir):   # written by save_4bit: only load_4bit reads it, and it has no dense weights
        for refused, why in ((cfg.load_in_4bit == "off", "--load-in-4bit off"),
                             (cfg.quant_type == "none", "--quant-type none (16-bit LoRA)"),
                             (cfg.init_lora_weights == "loftq", "--init-lora-weights loftq")):
            if refused:
                raise ConfigError(f"{why} needs dense weights, and {model_dir!r} is a 4-bit checkpoint (save_4bit)")
        return True
    if cfg.load_in_4bit == "off" or cfg.quant_type == "none" or cfg.init_lora_weights == "loftq":
        return False   # (validate() refuses "on" with the last two)
    problem = load_4bit_problem(model_dir)
    if cfg.load_in_4bit == "on" and problem is not None:
        raise ConfigError(f"--load-in-4bit on: {problem}")
    return problem is None and (cfg.load_in_4bit == "on" or device.type == "cuda" or auto_on_cpu)


def load_for_run(cfg: TrainConfig, model_dir: str, dtype: torch.dtype, device: torch.device, quantize: bool,
                 log: Callable[[str], None],
                 template_notes: bool = True) -> Tuple[torch.nn.Module, object, str, bool]:
    """(model, tokenizer, model directory, whether the base was quantized as it loaded): the run's model loaded
    dense, or with quantize (resolve_load_in_4bit's answer) through load_4bit with the run's settings; the
    tokenizer with the run's --chat-template, if it has one (its notes logged where template_notes: training
    logged them once; merge, eval and generate need not again). Under
    --load-in-4bit auto, a checkpoint load_4bit cannot read as it is (names transformers maps, float32 modules)
    loads dense, as it did before load_4bit existed, with a note; under on it is an error."""
    settings = dict(target_modules=cfg.target_modules, quant_type=cfg.quant_type, double_quant=cfg.double_quant,
                    blocksize=cfg.blocksize, compute_dtype=compute_dtype_for(device)) if quantize else None
    try:
        loaded = (*load_model_and_tokenizer(model_dir, dtype, device, log, quantize=settings), quantize)
    except ConfigError as e:
        if not quantize or cfg.load_in_4bit == "on" or is_4bit_checkpoint(model_dir):
            raise
        log(f"note: {e}; loading the dense model instead")
        loaded = (*load_model_and_tokenizer(model_dir, dtype, device, log), False)
    if cfg.chat_template is not None:
        use_chat_template(loaded[1], cfg.chat_template, log if template_notes else lambda s: None)
    return loaded


def packing_for(packing: str, files, model: torch.nn.Module, device: torch.device,
                log: Callable[[str], None]) -> str:
    """--packing resolved for these files and this model: auto is bfd for instruction data, where the model keeps
    packed examples apart (loss.packed_attention_problem; else wrapped, with a note); bfd asked for on a model
    that cannot is an error."""
    resolved = resolve_packing(packing, files)
    if resolved != "bfd":
        return resolved
    problem = packed_attention_problem(model, device, autocast_for(device), max_positions(model))
    if problem is None:
        return "bfd"
    if packing == "bfd":
        raise ConfigError(f"--packing bfd: {problem}; use --packing wrapped")
    log(f"note: {problem}: the examples are packed wrapped instead (one stream cut into blocks)")
    return "wrapped"


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup over warmup_steps, then constant, or a
    cosine or linear decay toward 0 at the last step (transformers' cosine and linear schedules). A pure function
    of the step, so resuming needs no scheduler state."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = (step - cfg.warmup_steps) / span
    if cfg.schedule == "linear":
        return cfg.lr * max(0.0, 1.0 - progress)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def autocast_for(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model, blocks: torch.Tensor, batch_size: int, device: torch.device,
             labels: Optional[torch.Tensor] = None, positions: Optional[torch.Tensor] = None) -> float:
    """Mean next-token cross-entropy (nats) over the predicted tokens of all eval blocks that are trained on
    (labels not -100; without labels all of them: every block has the same length, so the mean of the per-batch
    means weighted by batch size is the mean over tokens; with labels, each batch's mean is weighted by its
    count of labelled tokens). positions: the blocks' position ids (bfd packing)."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for i in range(0, blocks.shape[0], batch_size):
        ids = blocks[i: i + batch_size].to(device)
        batch_labels = None if labels is None else labels[i: i + batch_size].to(device)
        batch_positions = None if positions is None else positions[i: i + batch_size].to(device)
        with autocast_for(device):
            loss = causal_lm_loss(model, ids, batch_labels, batch_positions)
        weight = ids.shape[0] if batch_labels is None else int((batch_labels[:, 1:] != IGNORE).sum())
        total += float(loss) * weight
        n += weight
    model.train(was_training)
    return total / n


def memory_bytes(device: torch.device, optimizer=None) -> Dict[str, int]:
    """Peak memory so far. CPU: the process's peak resident set. CUDA: torch's peak allocation plus the
    paged optimizer's managed arena (torch.cuda.max_memory_allocated does not see managed memory; the arena
    is counted whole, as if resident on the GPU), torch's peak reserved pool (allocations plus the caching
    allocator's slack), and the device-wide use now from cudaMemGetInfo."""
    out = {"process_peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.type == "cuda":
        out["cuda_max_allocated"] = torch.cuda.max_memory_allocated(device)
        out["cuda_max_reserved"] = torch.cuda.max_memory_reserved(device)
        # PagedAdamW(paged=True) keeps its states in a cudaMallocManaged arena of state_bytes() bytes.
        paged = getattr(optimizer, "paged", False) and callable(getattr(optimizer, "state_bytes", None))
        out["optimizer_managed"] = int(optimizer.state_bytes()) if paged else 0
        out["peak"] = out["cuda_max_allocated"] + out["optimizer_managed"]
        free, total = torch.cuda.mem_get_info(device)
        out["device_used_now"] = total - free
    else:
        out["peak"] = out["process_peak_rss"]
    return out


def base_bits_per_param(model) -> Optional[float]:
    """Storage of the quantized base weights, measured from their buffers (None when nothing is quantized)."""
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    if not layers:
        return None
    nbytes = sum(m.weight.nbytes() for m in layers)
    numel = sum(m.in_features * m.out_features for m in layers)
    return 8.0 * nbytes / numel


def base_formats(model) -> list:
    """The formats of the model's 4-bit layers, with counts ("210 x nf4 + double quant, blocksize 64"), most
    common first: what the base is, whatever the run's flags (a 4-bit checkpoint keeps its own)."""
    counts = collections.Counter(
        f"{m.quant_type}{' + double quant' if m.double_quant else ''}, blocksize {m.blocksize}"
        for m in model.modules() if isinstance(m, Linear4bit))
    return [f"{n} x {fmt}" for fmt, n in counts.most_common()]


def note_4bit_checkpoint(cfg: TrainConfig, model_dir: str, dtype: torch.dtype, log: Callable[[str], None]) -> None:
    """Says where a save_4bit checkpoint's layers differ from what the run's flags and load dtype would build from
    the dense model: they keep their saved format, and their codes were computed from weights in their saved
    weight_dtype (a run that quantizes the dense model in another dtype has another base)."""
    layers = checkpoint_spec(model_dir)["layers"]
    formats = {(v["quant_type"], v["double_quant"], v["blocksize"]) for v in layers.values()}
    if formats != {(cfg.quant_type, cfg.double_quant, cfg.blocksize)}:
        shown = ", ".join(f"{q}{' + double quant' if dq else ''} blocksize {b}" for q, dq, b in sorted(formats))
        log(f"note: the 4-bit checkpoint's layers keep their format ({shown}); --quant-type, --double-quant and "
            "--blocksize apply only to layers it holds dense")
    dtypes = sorted({v["weight_dtype"] for v in layers.values()})
    name = str(dtype).removeprefix("torch.")
    if dtypes != [name]:
        log(f"note: the 4-bit checkpoint was quantized from {'/'.join(dtypes)} weights and this run loads in {name}: "
            f"quantizing the dense model here would give another base (`qlora-train quantize --dtype {name}` "
            "gives this run's)")


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


class Trainer:
    """One run. `Trainer(cfg).run()` returns the result dict that report.write_report turns into files."""

    def __init__(self, cfg: TrainConfig, log: Callable[[str], None] = print):
        self.cfg = cfg.validate()
        self.log = log
        check_output_dir(cfg.output_dir, cfg.resume, cfg.overwrite_output_dir, cfg.model,   # before anything loads
                         [cfg.init_adapter, *cfg.data, *cfg.eval_data])
        self.device = resolve_device(cfg.device)
        if self.device.type == "cuda":
            set_linear_backend(cfg.linear_backend)  # process-wide, as torch.backends switches are

    # -- setup ---------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg, dev = self.cfg, self.device
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        t0 = time.perf_counter()
        summary_writer_class(cfg.report_to)   # before the model loads: a missing package fails in a second
        # (before the model loads: a wrong path fails in a second; a search leaves this run's own files out)
        files = find_text_files(cfg.data, skip=own_paths(cfg.output_dir))
        eval_files = find_text_files(cfg.eval_data, "--eval-data", own_paths(cfg.output_dir)) if cfg.eval_data else []
        twice = sorted(f for f, n in collections.Counter(os.path.realpath(f) for f in files).items() if n > 1)
        if twice:   # (as datasets would: each time given, trained on)
            self.log(f"note: {twice[0]}{f' and {len(twice) - 1} more' if len(twice) > 1 else ''} "
                     f"{'are' if len(twice) > 1 else 'is'} in --data more than once, and trained on as often")
        self.files = [os.path.abspath(f) for f in files]
        self.eval_files = [os.path.abspath(f) for f in eval_files]
        both = sorted({os.path.realpath(f) for f in files} & {os.path.realpath(f) for f in eval_files})
        if both:
            raise ConfigError(f"--eval-data would evaluate on text the run trains on: {both[0]}"
                              f"{f' and {len(both) - 1} more' if len(both) > 1 else ''} "
                              f"{'are' if len(both) > 1 else 'is'} in --data too")
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        model_dir = resolve_model_dir(cfg.model, self.log)
        self.model, self.tokenizer, self.model_dir, self.loaded_4bit = load_for_run(
            cfg, model_dir, dtype, dev, resolve_load_in_4bit(cfg, dev, model_dir), self.log)
        self.from_4bit_checkpoint = is_4bit_checkpoint(self.model_dir)
        if self.from_4bit_checkpoint:
            self.log("model: a 4-bit checkpoint (save_4bit), its 4-bit layers read as they were saved")
            note_4bit_checkpoint(cfg, self.model_dir, dtype, self.log)
        elif self.loaded_4bit:
            self.log("model: quantized as its checkpoint was read (the dense model was never held)")
        limit = max_positions(self.model)
        if limit and cfg.seq_len > limit:
            raise ConfigError(f"--seq-len {cfg.seq_len} is longer than the model allows "
                              f"(max_position_embeddings = {limit})")
        self.packing = packing_for(cfg.packing, files, self.model, dev, self.log) if not cfg.resume else (
            self.resumed_packing(files))
        self.data: TokenBlocks = run_blocks(files, eval_files, self.tokenizer, cfg.seq_len, cfg.eval_blocks,
                                            self.packing, cfg.add_bos, cfg.max_tokens, vocab_size(self.model),
                                            cfg.num_proc)
        self.log(f"data: {self.data.describe()}")
        if cfg.epochs:
            per_step = cfg.batch_size * cfg.grad_accum
            steps = max(1, math.ceil(cfg.epochs * self.data.train.shape[0] / per_step))
            self.cfg = cfg = dataclasses.replace(cfg, steps=steps)
            self.log(f"--epochs {cfg.epochs:g}: {steps} steps of {per_step} blocks over "
                     f"{self.data.train.shape[0]} train blocks")
        if self.data.train.shape[0] < cfg.batch_size:
            self.log(f"note: only {self.data.train.shape[0]} training blocks for --batch-size {cfg.batch_size}: "
                     "blocks repeat within a batch")
        self.dense_eval_loss = None
        # a model loaded 4-bit (a pre-quantized bitsandbytes checkpoint, or quantized as it loaded) has no dense
        # base to compare with
        self.prequantized = holds_bnb_linear_4bit(self.model)
        if not cfg.resume and not self.prequantized and not self.loaded_4bit:
            self.dense_eval_loss = self.evaluate()
        prepare_for_run(self.model, cfg, dev, self.tokenizer)
        if cfg.init_adapter and not cfg.resume:  # (a resumed run takes its checkpoint's adapters)
            try:
                load_peft_adapter(self.model, cfg.init_adapter)
            except ValueError as e:  # another r or alpha, other target modules, DoRA, ...
                raise ConfigError(f"--init-adapter: {e}") from e
            self.log(f"adapters: started from {cfg.init_adapter}")
        if cfg.gradient_checkpointing:
            # transformers >= 5.2x names it activation_checkpointing_enable; older ones gradient_...
            if hasattr(self.model, "activation_checkpointing_enable"):
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            elif hasattr(self.model, "gradient_checkpointing_enable"):
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.log("note: this model has no gradient_checkpointing_enable(); training without it")
        if getattr(self.model, "config", None) is not None:
            self.model.config.use_cache = False
        if cfg.neftune_noise_alpha:   # (the noise is on while run() trains)
            try:
                input_embeddings(self.model)
            except ValueError as e:
                raise ConfigError(f"--neftune-noise-alpha: {e}") from e
        self.summary = model_summary(self.model)
        self.log(f"model: {self.model_dir}: {self.summary}")
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        embeddings = [p for m in self.model.modules() if isinstance(m, (torch.nn.Embedding, TrainableTokens))
                      for p in m.parameters() if p.requires_grad]   # (a trained copy, --modules-to-save; trained rows)
        self.optimizer = make_optimizer(cfg.optimizer, self.params, cfg.lr, cfg.weight_decay, embeddings)
        self.setup_seconds = time.perf_counter() - t0

    def resumed_packing(self, files) -> str:
        """The packing a resumed run began with (its checkpoint says; the probe is not asked again: on another
        device or load path it might answer otherwise), else as a new run resolves it."""
        path = ckpt.latest_checkpoint(self.cfg.output_dir)
        saved = ckpt.saved_trainer_value(path, "packing") if path else None
        return saved or packing_for(self.cfg.packing, files, self.model, self.device, self.log)

    def evaluate(self) -> float:
        """The eval loss of the model now on the held-out blocks."""
        return evaluate(self.model, self.data.eval, self.cfg.batch_size, self.device, self.data.eval_labels,
                        self.data.eval_positions)

    # -- loop ----------------------------------------------------------------------------------------
    def run(self) -> dict:
        self.setup()
        cfg, dev = self.cfg, self.device   # (after setup: --epochs sets the steps)
        if cfg.warmup_steps > cfg.steps:
            self.log(f"note: --warmup-steps {cfg.warmup_steps} is more than the run's {cfg.steps} steps: the "
                     "learning rate never reaches --lr")
        os.makedirs(cfg.output_dir, exist_ok=True)
        config = cfg.to_dict()
        state = {"micro_step": 0, "history": [], "evals": [], "train_seconds": 0.0, "tokens": 0,
                 "dense_eval_loss": self.dense_eval_loss, "data_fingerprint": self.data.fingerprint(),
                 "packing": self.packing, "device": dev.type}   # (where it trained: how `eval` rebuilds it)
        step = 0
        if cfg.resume:
            path = ckpt.latest_checkpoint(cfg.output_dir)
            if path is None:
                raise ConfigError(f"--resume: no checkpoint in {cfg.output_dir}/checkpoints")
            state = ckpt.load_checkpoint(path, self.model, self.optimizer)
            restore_from_checkpoint(cfg.output_dir, path, state)
            step = state.pop("step")
            if step > cfg.steps:
                raise ConfigError(f"--resume: --steps {cfg.steps} is below the checkpoint's step {step}")
            began = state.get("data_fingerprint")   # (None: a checkpoint from before fingerprints: adopt today's)
            if began is not None and began != self.data.fingerprint():
                data = ", ".join(cfg.data + cfg.eval_data) or "the default text"
                raise ConfigError(f"--resume: the data ({data}) no longer packs into the blocks the run began with "
                                  "(files edited, added or removed since, or another tokenizers or torch version): "
                                  "a resumed run would be another run; start a new one in another --output-dir")
            state["data_fingerprint"] = self.data.fingerprint()
            state["device"] = dev.type
            record_resumed_settings(cfg, state)   # (last: a refused resume leaves config.json as it was)
            self.log(f"resumed from {path} at step {step}")
        else:
            # a new run here (--overwrite-output-dir, checked in __init__): never let --resume mix it with an
            # earlier one, nor eval or merge take that one's adapters, nor its logs pass for this run's
            if clear_previous_run(cfg.output_dir):
                self.log(f"new run in {cfg.output_dir}: removed the previous run's files (--overwrite-output-dir)")
            cfg.save(os.path.join(cfg.output_dir, ckpt.CONFIG_FILE))
            loss0 = self.evaluate()
            state["evals"].append({"step": 0, "loss": loss0, "ppl": math.exp(loss0)})
            self.log(f"eval before training: loss {loss0:.4f}, perplexity {math.exp(loss0):.2f} " + (
                "(the model was loaded 4-bit by bitsandbytes: no dense base)" if self.prequantized else
                "(a 4-bit checkpoint: no dense base)" if self.from_4bit_checkpoint else
                "(quantized as it loaded: no dense base evaluated)" if self.dense_eval_loss is None else
                f"(dense base before quantization: {math.exp(self.dense_eval_loss):.2f})"))

        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        run_log = RunLog(cfg.output_dir, cfg.report_to, state["history"], state["evals"])
        try:   # (the trained model generates and merges without NEFTune's noise)
            with neftune(self.model, cfg.neftune_noise_alpha):
                step = self._train(state, step, run_log, config)
        finally:
            run_log.close()
        if cfg.load_best_model_at_end and state.get("best"):
            self.load_best(state["best"])
        ckpt.save_adapters(os.path.join(cfg.output_dir, ckpt.ADAPTER_FILE), self.model, config)
        # the same adapters for PEFT and the tools that read its folders (peft.PeftModel.from_pretrained)
        # a PEFT adapter's base is the dense model (PEFT cannot load a 4-bit checkpoint): the one it was quantized from
        base = checkpoint_source(self.model_dir) if self.from_4bit_checkpoint else self.model_dir
        save_peft_adapter(self.model, os.path.join(cfg.output_dir, PEFT_DIR), base_model_name_or_path=base)
        return self.result(state, step)

    def load_best(self, best: dict) -> None:
        """Puts the best eval's adapters (kept in best_adapter_path as the run went) back into the model."""
        path = best_adapter_path(self.cfg.output_dir, best["step"])
        saved = saved_best_step(path)
        if saved != best["step"]:
            raise ConfigError(f"--load-best-model-at-end: {path} should hold the adapters of step {best['step']} "
                              f"(the best eval), and holds " + (f"step {saved}'s" if saved is not None else "none"))
        ckpt.load_adapters(self.model, path)
        self.log(f"the adapters of the best eval: step {best['step']}, eval loss {best['loss']:.4f}")

    def _train(self, state: dict, step: int, run_log: RunLog, config: dict) -> int:
        """The optimizer steps from `step` to --steps, with evaluations and checkpoints; returns the last step."""
        cfg = self.cfg
        self.model.train()
        if not cfg.progress:
            return self._steps(state, step, run_log, config, None)
        from tqdm.auto import tqdm
        with tqdm(total=cfg.steps, initial=step, desc="train", dynamic_ncols=True) as bar:
            return self._steps(state, step, run_log, config, bar)

    def _steps(self, state: dict, step: int, run_log: RunLog, config: dict, bar) -> int:
        cfg, dev = self.cfg, self.device
        n_train = self.data.train.shape[0]
        while step < cfg.steps and not state.get("stopped_early_at"):
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss_sum = 0.0
            micro = [batch_indices(n_train, cfg.batch_size, cfg.seed, state["micro_step"] + i)
                     for i in range(cfg.grad_accum)]
            # With labels, the micro-batches' mean losses are weighted by their labelled tokens, so the step's
            # gradient is that of the mean over all its trained tokens (not a mean of means); text: 1 / grad_accum.
            # the tokens the step trains on: its blocks less their padding (bfd)
            tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
            if self.data.train_padding is not None:
                tokens_per_step -= sum(int(self.data.train_padding[idx].sum()) for idx in micro)
            weights = None
            if self.data.train_labels is not None:
                counts = [int((self.data.train_labels[idx][:, 1:] != IGNORE).sum()) for idx in micro]
                weights = [c / sum(counts) for c in counts]
            for i, idx in enumerate(micro):
                ids = self.data.train[idx].to(dev, non_blocking=True)
                labels = None if self.data.train_labels is None else self.data.train_labels[idx].to(dev)
                positions = None if self.data.train_positions is None else self.data.train_positions[idx].to(dev)
                with autocast_for(dev):
                    loss = causal_lm_loss(self.model, ids, labels, positions)
                if weights is None:
                    (loss / cfg.grad_accum).backward()
                    loss_sum += float(loss.detach())
                else:
                    (loss * weights[i]).backward()
                    loss_sum += float(loss.detach()) * weights[i] * cfg.grad_accum   # (train_loss divides by it)
                state["micro_step"] += 1
            if cfg.max_grad_norm > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm))
            else:
                grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None]))
            if not math.isfinite(grad_norm):   # before the step: no checkpoint of NaN adapters
                raise FloatingPointError(f"the gradient's norm is {grad_norm} at step {step + 1}; lower --lr")
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            dt = time.perf_counter() - t0
            step += 1
            state["train_seconds"] += dt
            state["tokens"] += tokens_per_step
            train_loss = loss_sum / cfg.grad_accum
            if not math.isfinite(train_loss):
                raise FloatingPointError(f"training loss is {train_loss} at step {step}; lower --lr")
            mem = memory_bytes(dev, self.optimizer)["peak"]
            state["history"].append({"step": step, "loss": train_loss, "lr": lr, "grad_norm": grad_norm,
                                     "tokens_per_s": tokens_per_step / dt, "peak_memory_bytes": mem})
            run_log.step(state["history"][-1])
            if bar is not None:
                bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tokens_per_step / dt:.0f}", mem=_fmt_bytes(mem),
                                refresh=False)
                bar.update(1)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                ev = self.evaluate()
                state["evals"].append({"step": step, "loss": ev, "ppl": math.exp(ev)})
                run_log.evaluation(step, ev)
                msg = f"step {step}: eval loss {ev:.4f}, perplexity {math.exp(ev):.2f}"
                improved, stop = observe_eval(state, step, ev, cfg.early_stopping_patience,
                                              cfg.early_stopping_threshold)
                if improved and cfg.load_best_model_at_end:
                    save_best_adapters(cfg.output_dir, self.model, config, step)
                if stop and step < cfg.steps:   # (at the last step the run ends anyway)
                    state["stopped_early_at"] = step
                    msg += (f"; stopping early: {state['evals_without_improvement']} evals without a lower eval loss "
                            f"than step {state['best']['step']}'s {state['best']['loss']:.4f}")
                bar.write(msg) if bar is not None else self.log(msg)
            if step % cfg.save_every == 0 or step == cfg.steps or state.get("stopped_early_at") == step:
                ckpt.save_checkpoint(cfg.output_dir, step, self.model, self.optimizer, state, config,
                                     keep=cfg.save_total_limit,
                                     extra_files=for_checkpoint(cfg.output_dir, state)
                                     if cfg.load_best_model_at_end else None)
        return step

    def result(self, state: dict, step: int) -> dict:
        cfg = self.cfg
        evals = state["evals"]
        bits = base_bits_per_param(self.model)
        best = state.get("best")
        # the eval of the adapters the run ends with: the best one's with --load-best-model-at-end
        final = next(e for e in evals if e["step"] == best["step"]) if cfg.load_best_model_at_end and best else \
            (evals[-1] if evals else None)
        return {
            "config": cfg.to_dict(),
            "model_dir": os.path.abspath(self.model_dir),
            "device": str(self.device) + (f" ({torch.cuda.get_device_name(self.device)})"
                                          if self.device.type == "cuda" else ""),
            "torch": torch.__version__,
            "data": {"files": len(self.data.files), "tokens": self.data.total_tokens,
                     "trained_tokens": self.data.trained_tokens, "packing": self.packing,
                     "file_paths": self.files, "eval_file_paths": self.eval_files,
                     "fingerprint": self.data.fingerprint(),
                     "examples": self.data.examples if self.packing == "bfd" else None,
                     "padding_tokens": self.data.padding_tokens if self.packing == "bfd" else None,
                     "train_blocks": int(self.data.train.shape[0]), "eval_blocks": int(self.data.eval.shape[0]),
                     "seq_len": cfg.seq_len},
            "steps": step,
            "trainable_params": self.summary.trainable_params,
            "total_params": self.summary.total_params,
            "model_bytes": self.summary.model_bytes,
            "quantized_layers": self.summary.quantized_layers,
            "base_bits_per_param": bits,
            "base_quantized_while_loading": self.loaded_4bit and not self.from_4bit_checkpoint,
            "base_from_4bit_checkpoint": self.from_4bit_checkpoint,
            "base_formats": base_formats(self.model),
            "tokens_trained": state["tokens"],
            "train_seconds": state["train_seconds"],
            "tokens_per_s": state["tokens"] / max(state["train_seconds"], 1e-9),
            "memory": memory_bytes(self.device, self.optimizer),
            "dense_eval_loss": state.get("dense_eval_loss"),
            "eval_before": evals[0] if evals else None,
            "eval_after": final,
            "evals": evals,
            "best_eval": best,
            "stopped_early_at": state.get("stopped_early_at"),
            "history": state["history"],
            "adapter": os.path.abspath(os.path.join(cfg.output_dir, ckpt.ADAPTER_FILE)),
            "peft_adapter": os.path.abspath(os.path.join(cfg.output_dir, PEFT_DIR)),
        }


def train(cfg: TrainConfig, log: Callable[[str], None] = print, sample_prompt: Optional[str] = None) -> dict:
    """Runs cfg and writes the report; returns the result dict (with report paths under "report"; with
    sample_prompt, also "sample": the trained model's continuation of it, as `qlora-train generate` writes it)."""
    from .report import write_report

    trainer = Trainer(cfg, log)
    result = trainer.run()
    result["report"] = write_report(result, cfg.output_dir)
    if sample_prompt is not None:
        from .generate import generate_text
        result["sample"] = generate_text(trainer.model, trainer.tokenizer, sample_prompt, max_new_tokens=40)
    return result
