"""QLoRA training speed and peak memory on the GPU, side by side in one process: qlora_ext (NF4 + double
quant, our kernels, PagedAdamW) vs transformers + PEFT + bitsandbytes (BitsAndBytesConfig nf4 + double
quant, bnb.optim.PagedAdamW), on a LLaMA-7B-shaped model with random weights.

    python bench/bench_train_gpu.py [--layers 32 | --quick] [--batch 1] [--seq-len 512]
                                    [--warmup 2] [--steps 5] [--linear-backend auto|fused|tune|...]
                                    [--json out.json]

Needs a CUDA GPU (sm_80+) and a CUDA build of qlora_ext (exits 2 with one line otherwise), transformers;
the peer needs peft and bitsandbytes (pip install peft==0.21.2 bitsandbytes==0.50.2, or their wheels in
.whl/ for bench/gpu_check.sh). Without them ours runs alone and the goals are not evaluated.

The model: LlamaConfig of LLaMA-7B shape (hidden 4096, intermediate 11008, 32 layers, 32 heads, vocab
32000, untied lm_head; --layers N keeps N layers, --quick keeps 4), weights N(0, 0.02) (norms 1) drawn on
the GPU in bf16 one module at a time from one seeded generator, in the same order for both sides, so both
start from the same dense weights.
  ours:  qlora_ext.train.study.build_quantized_llama (each decoder layer drawn, then quantized by
         prepare_model: NF4, double quant, blocksize 64, LoRA r=16 on q/k/v/o/gate/up/down, alpha set to
         32 afterwards, fp32 adapters; the dense model is never held); PagedAdamW (states in managed memory).
  peer:  the dense bf16 model drawn whole, then loaded through transformers' own 4-bit loader,
         LlamaForCausalLM.from_pretrained(None, config=..., state_dict=<dense weights>,
         quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
         bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=bf16), dtype=bf16, device_map={"": 0}):
         the same quantizer and bnb.nn.Linear4bit / Params4bit path as loading a checkpoint from disk,
         without writing 13.5 GB (--peer-load disk does the save_pretrained + from_pretrained(dir)
         round trip instead, into --tmpdir); then peft get_peft_model(LoraConfig(r=16, lora_alpha=32,
         lora_dropout=0, target_modules=the 7 projections, task_type=CAUSAL_LM)) (fp32 adapters, peft's
         default) and bnb.optim.PagedAdamW (32-bit states, paged). No prepare_model_for_kbit_training
         (it would upcast the embeddings and lm_head to fp32 on the peer's side only).
  loss:  ours the trainer's (qlora_ext.train.loss.causal_lm_loss: the lm_head's cross-entropy a chunk of
         tokens at a time, no [tokens, vocab] logits); the peer transformers' (model(..., labels=ids).loss).
  both:  gradient checkpointing (non-reentrant), bf16 autocast, use_cache off, lr 2e-4 constant, weight
         decay 0, gradient clipping at 1.0 (TrainConfig's defaults), the same random token batches
         (batch x seq-len, labels = inputs).
Ours runs first and is freed completely (gc, torch.cuda.empty_cache) before the peer is built (the peer
goes last because bitsandbytes never frees its paged optimizer memory); peak statistics are reset after
each model and optimizer are built, so the peaks are of training alone.

Measured: tokens/s = batch x seq-len x timed steps / their CUDA-synchronized wall time (after the warm-up
steps); peak memory = torch.cuda.max_memory_allocated + the paged optimizer's managed bytes (ours:
PagedAdamW.state_bytes(); the peer: bitsandbytes' paged state tensors; torch does not see managed memory),
and the device-wide use from torch.cuda.mem_get_info before the build and after the last step; the loss
of every step (the last one printed for both).
Goals (issue: GPU training comparison): ours >= 1.3x the peer's tokens/s; our peak <= the peer's peak.
A third side, qlora_ext_tune (--only ...,qlora_ext_tune; bench/gpu_check.sh runs it last), is ours with
backend "tune" (each linear shape's fastest of dequantize + cuBLAS and the fused kernels, measured in the
warm-up steps): printed for information, what "auto" would reach by routing on measurements; not a goal.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import shutil
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from cuda_bench import cuda_unavailable_reason  # noqa: E402  (bench/ is on sys.path)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SPEED_GOAL = 1.3
LR, MAX_GRAD_NORM = 2e-4, 1.0  # qlora_ext.train.config.TrainConfig's defaults


def llama_config(s):
    """The LlamaConfig that qlora_ext.train.study.build_quantized_llama builds for shape s."""
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.ffn, num_hidden_layers=s.layers,
                       num_attention_heads=s.heads, num_key_value_heads=s.heads, max_position_embeddings=2048,
                       tie_word_embeddings=False)


def dense_llama(s, dev, seed, dtype):
    """The dense model with the weights build_quantized_llama draws for the same seed: built on the meta device,
    each module materialized on `dev` and filled in the same order (decoder layers, embed_tokens, norm, lm_head;
    norms 1, everything else N(0, 0.02) from one generator on `dev`)."""
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from qlora_ext.train.study import materialize_random_

    cfg = llama_config(s)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(dtype)
    g = torch.Generator(device=dev).manual_seed(seed)
    for module in [*model.model.layers, model.model.embed_tokens, model.model.norm, model.lm_head]:
        materialize_random_(module, dev, g)
    with torch.device(dev):
        model.model.rotary_emb = LlamaRotaryEmbedding(cfg)
    return model, cfg


def enable_checkpointing(model):
    model.config.use_cache = False
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def hf_loss(model, ids):
    """transformers' loss: the full [tokens, vocab] logits, then cross-entropy."""
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def build_ours(s, dev, seed, r, alpha, linear_backend="auto"):
    import qlora_ext
    from qlora_ext.nn import Linear4bit, LoRALinear
    from qlora_ext.optim import PagedAdamW
    from qlora_ext.train.loss import causal_lm_loss
    from qlora_ext.train.study import build_quantized_llama

    model = build_quantized_llama(s, dev, r=r, seed=seed, quant_type="nf4")
    adapters = [m for m in model.modules() if isinstance(m, LoRALinear)]
    names = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert len(adapters) == 7 * s.layers and names == set(TARGETS), (len(adapters), names)
    assert all(isinstance(m.base, Linear4bit) and m.base.quant_type == "nf4" and m.base.double_quant
               for m in adapters)
    for m in adapters:  # the study builds alpha 16; the comparison uses alpha 32 on both sides
        m.alpha, m.scaling = float(alpha), float(alpha) / m.r
    enable_checkpointing(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = PagedAdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    qlora_ext.set_linear_backend(linear_backend)  # process-wide; the peer does not use our ops
    info = {"loss_fn": causal_lm_loss, "linear_backend": linear_backend,
            "optimizer": f"qlora_ext.optim.PagedAdamW (paged={opt.paged and dev.type == 'cuda'})",
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "adapter_dtype": str(adapters[0].lora_A.dtype)}
    return model, params, opt, info


def build_peer(s, dev, seed, r, alpha, load, tmpdir, attn):
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    cuda = dev.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    dense, cfg = dense_llama(s, dev, seed, dtype)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=torch.uint8)
    device_map = {"": dev.index if dev.index is not None else torch.cuda.current_device()} if cuda else {"": "cpu"}
    kw = dict(quantization_config=q, dtype=dtype, device_map=device_map)
    if attn:
        kw["attn_implementation"] = attn
    if load == "memory":
        sd = dense.state_dict()
        del dense
        model = LlamaForCausalLM.from_pretrained(None, config=cfg, state_dict=sd, **kw)
        del sd
        how = "from_pretrained(None, config, state_dict=dense weights, quantization_config)"
    else:
        path = tempfile.mkdtemp(prefix="bench_train_gpu_", dir=tmpdir)
        try:
            dense.save_pretrained(path)
            del dense
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            model = LlamaForCausalLM.from_pretrained(path, **kw)
        finally:
            shutil.rmtree(path, ignore_errors=True)
        how = "save_pretrained (safetensors) + from_pretrained(dir, quantization_config)"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert getattr(model, "is_loaded_in_4bit", False) and n4 == 7 * s.layers, (n4, s.layers)
    enable_checkpointing(model)
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=TARGETS,
                                             bias="none", task_type="CAUSAL_LM"))
    n_lora = sum(type(m).__module__.startswith("peft.tuners.lora.bnb") for m in model.modules())
    assert n_lora == 7 * s.layers, f"peft made {n_lora} bnb LoRA layers, expected {7 * s.layers}"
    params = [p for p in model.parameters() if p.requires_grad]
    if cuda:
        opt = bnb.optim.PagedAdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, optim_bits=32)
        opt_name = "bitsandbytes.optim.PagedAdamW (32-bit, paged)"
    else:  # CPU debug run: bnb's paged optimizers need CUDA
        opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        opt_name = "torch.optim.AdamW (CPU debug run)"
    info = {"loss_fn": hf_loss, "optimizer": opt_name, "load": how,
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "adapter_dtype": str(params[0].dtype), "bnb_linear4bit_layers": n4}
    return model, params, opt, info


def paged_bytes(opt) -> int:
    """Managed (paged) optimizer memory, which torch's allocator statistics do not see."""
    if getattr(opt, "paged", False) and callable(getattr(opt, "state_bytes", None)):
        return int(opt.state_bytes()) if opt._arenas else 0  # qlora_ext PagedAdamW (arena only on CUDA)
    return sum(v.nbytes for st in opt.state.values() for v in st.values()
               if torch.is_tensor(v) and getattr(v, "is_paged", False))  # bitsandbytes' paged state tensors


def tensor_bytes(model) -> int:
    """Bytes of the model's parameters and buffers, each storage once (bitsandbytes' quant_state constants,
    which are neither, are left out: about 0.02 B per 4-bit weight)."""
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        st = t.untyped_storage()
        seen[(t.device, st.data_ptr())] = st.nbytes()
    return sum(seen.values())


def device_used(dev):
    if dev.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(dev)
    return total - free


def run(name, build, batches, dev, log):
    cuda = dev.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(dev)) if cuda else (lambda: None)
    used_before = device_used(dev)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, params, opt, info = build()
    loss_fn = info.pop("loss_fn")
    info["loss"] = f"{loss_fn.__module__}.{loss_fn.__name__}"
    sync()
    build_s = time.perf_counter() - t0
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    model_bytes = torch.cuda.memory_allocated(dev) if cuda else None
    model_tensors = tensor_bytes(model)
    if cuda and model_bytes - model_tensors > 2**30:  # e.g. the dense weights still referenced somewhere
        print(f"  WARNING {name}: {model_bytes / 2**30:.2f} GiB allocated after the build, but the model's tensors "
              f"are {model_tensors / 2**30:.2f} GiB: something else holds memory, and the peak includes it")
    n_trainable = sum(p.numel() for p in params)
    log(f"  {name}: built in {build_s:.1f} s; {n_trainable:,} trainable params; "
        + (f"{model_bytes / 2**30:.2f} GiB allocated; " if cuda else "") + info["optimizer"])
    model.train()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    times, losses = [], []
    for i, ids in enumerate(batches):
        sync()
        t = time.perf_counter()
        with autocast:
            loss = loss_fn(model, ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t)
        losses.append(float(loss.detach()))
        del loss
        log(f"    step {i + 1}/{len(batches)}: loss {losses[-1]:.4f}, {times[-1]:.3f} s")
    out = {"name": name, **info, "build_seconds": build_s, "trainable_params": n_trainable,
           "model_allocated": model_bytes, "model_tensor_bytes": model_tensors, "step_seconds": times,
           "losses": losses, "last_loss": losses[-1]}
    if cuda:
        managed = paged_bytes(opt)
        out.update({"cuda_max_allocated": torch.cuda.max_memory_allocated(dev),
                    "cuda_max_reserved": torch.cuda.max_memory_reserved(dev), "optimizer_managed": managed,
                    "peak": torch.cuda.max_memory_allocated(dev) + managed,
                    "device_used_before_build": used_before, "device_used_after_steps": device_used(dev)})
    del model, params, opt
    gc.collect()
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32, help="decoder layers (default 32: LLaMA-7B)")
    p.add_argument("--quick", action="store_true", help="4 layers")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--linear-backend", default="auto", choices=("auto", "fused", "fused_mma", "dequant", "tune"),
                   help="our 4-bit GEMMs (qlora_ext.set_linear_backend; default auto, the shipped dispatcher)")
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default="qlora_ext,peft_bnb", help="which sides, in this order (default both)")
    p.add_argument("--peer-load", choices=("memory", "disk"), default="memory",
                   help="the peer's 4-bit load: from the dense state dict in memory (default), or saved to "
                        "--tmpdir with save_pretrained and loaded from there")
    p.add_argument("--tmpdir", default=None, help="for --peer-load disk (default: the system's temp folder)")
    p.add_argument("--json", default=None)
    p.add_argument("--quiet", action="store_true")
    # debug only: a tiny model on the CPU, to exercise the code path without a GPU
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    p.add_argument("--hidden", type=int, default=4096, help=argparse.SUPPRESS)
    p.add_argument("--ffn", type=int, default=11008, help=argparse.SUPPRESS)
    p.add_argument("--heads", type=int, default=32, help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, default=32000, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.layers = 4
    sides = [x.strip() for x in args.only.split(",") if x.strip()]
    if not sides or any(x not in ("qlora_ext", "peft_bnb", "qlora_ext_tune") for x in sides):
        p.error(f"--only takes qlora_ext, peft_bnb and/or qlora_ext_tune, got {args.only!r}")
    if "peft_bnb" in sides and sides.index("peft_bnb") < len(sides) - 1:
        print("note: the peer runs before some of ours; bitsandbytes never frees its paged optimizer memory, so "
              "the device-wide figure of what runs after it includes it")
    dev = torch.device(args.device)
    if dev.type == "cuda":
        reason = cuda_unavailable_reason("bench_train_gpu")
        if reason:
            print(reason, file=sys.stderr)
            return 2
    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))

    import transformers
    from qlora_ext.train.study import LlamaShape

    transformers.utils.logging.disable_progress_bar()  # the loader's per-tensor bar

    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    peer_missing = None
    try:
        import bitsandbytes
        import peft
        versions.update(peft=peft.__version__, bitsandbytes=bitsandbytes.__version__)
    except Exception as e:  # noqa: BLE001  (ImportError, or bnb failing to load its library)
        peer_missing = f"{type(e).__name__}: {e}"
        if "peft_bnb" in sides:
            print(f"peft_bnb: not importable ({peer_missing}); running qlora_ext alone, goals not evaluated")
            sides = [x for x in sides if x != "peft_bnb"]
    if not sides:
        print("nothing to run")
        return 1

    is7b = (args.hidden, args.ffn, args.heads, args.vocab) == (4096, 11008, 32, 32000)
    shape = LlamaShape("7B" if is7b else "custom", args.hidden, args.ffn, args.layers, args.heads, args.vocab)
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (debug run)"
    print(f"{gpu}; torch {torch.__version__}, transformers {transformers.__version__}"
          + (f", peft {versions['peft']}, bitsandbytes {versions['bitsandbytes']}" if "peft" in versions else ""))
    print(f"LLaMA-{shape.name}-shaped, {shape.layers} layers (hidden {shape.hidden}, ffn {shape.ffn}, "
          f"{shape.heads} heads, "
          f"vocab {shape.vocab}), random N(0, 0.02) weights; NF4 + double quant, LoRA r={args.r} alpha={args.alpha:g} "
          f"on {len(TARGETS)} projections; batch {args.batch} x {args.seq_len}, {args.warmup} warm-up + "
          f"{args.steps} timed steps, gradient checkpointing, "
          + ("bf16 autocast, paged AdamW" if dev.type == "cuda" else "fp32 (CPU debug run)"))

    g = torch.Generator().manual_seed(args.seed)
    batches = [torch.randint(0, shape.vocab, (args.batch, args.seq_len), generator=g).to(dev)
               for _ in range(args.warmup + args.steps)]
    attn = "sdpa"
    builders = {
        "qlora_ext": lambda: build_ours(shape, dev, args.seed, args.r, args.alpha, args.linear_backend),
        "qlora_ext_tune": lambda: build_ours(shape, dev, args.seed, args.r, args.alpha, "tune"),
        "peft_bnb": lambda: build_peer(shape, dev, args.seed, args.r, args.alpha, args.peer_load, args.tmpdir, attn),
    }
    results = []
    for name in sides:
        log(f"{name}:")
        try:
            r = run(name, builders[name], batches, dev, log)
        except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001  (keep the other side's numbers)
            # KeyboardInterrupt: bench/gpu_check.sh's time limit (SIGINT); the JSON still gets written
            print(f"{name}: failed: {type(e).__name__}: {e}")
            r = {"name": name, "error": f"{type(e).__name__}: {e}"}
            if isinstance(e, KeyboardInterrupt):
                results.append(r)
                break
        gc.collect()  # after the except block, whose traceback holds the failed side's frames (and tensors)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        timed = r.get("step_seconds", [])[args.warmup:]
        if timed:
            r["timed_seconds"] = sum(timed)
            r["tokens_per_s"] = args.batch * args.seq_len * len(timed) / sum(timed)
        if r.get("attn_implementation"):
            attn = r["attn_implementation"]  # the peer uses ours'
        results.append(r)

    gib = 2 ** 30
    print(f"\n{'':14} {'tokens/s':>9} {'step s':>7} {'peak GiB':>9} {'(alloc':>7} {'+ paged)':>8} "
          f"{'device GiB':>10} {'last loss':>9} {'trainable':>11}")
    for r in results:
        if "error" in r:
            print(f"{r['name']:14} failed: {r['error']}")
            continue
        tps = r.get("tokens_per_s")
        timed = sorted(r["step_seconds"][args.warmup:] or r["step_seconds"])
        med = timed[len(timed) // 2]
        if dev.type == "cuda":
            mem = (f"{r['peak'] / gib:9.2f} {r['cuda_max_allocated'] / gib:7.2f} {r['optimizer_managed'] / gib:8.3f} "
                   f"{r['device_used_after_steps'] / gib:10.2f}")
        else:
            mem = f"{'-':>9} {'-':>7} {'-':>8} {'-':>10}"
        print(f"{r['name']:14} {tps if tps else float('nan'):9.1f} {med:7.3f} {mem} {r['last_loss']:9.4f} "
              f"{r['trainable_params']:11,}")

    ok = {r["name"]: r for r in results if "error" not in r and r.get("tokens_per_s")}
    goals, ratios = {}, {}
    if "qlora_ext" in ok and "peft_bnb" in ok:
        ours, peer = ok["qlora_ext"], ok["peft_bnb"]
        ratios["speed"] = ours["tokens_per_s"] / peer["tokens_per_s"]
        goals["tokens_per_s_vs_peft_bnb"] = {"goal": SPEED_GOAL, "value": ratios["speed"],
                                             "met": ratios["speed"] >= SPEED_GOAL}
        print(f"GOAL tokens/s >= {SPEED_GOAL}x the peer's: {ratios['speed']:.2f}x -> "
              f"{'met' if goals['tokens_per_s_vs_peft_bnb']['met'] else 'NOT met'}")
        if dev.type == "cuda":
            ratios["peak_memory"] = ours["peak"] / peer["peak"]
            goals["peak_memory_vs_peft_bnb"] = {"goal": "<= 1.0", "value": ratios["peak_memory"],
                                                "met": ratios["peak_memory"] <= 1.0}
            print(f"GOAL peak memory <= the peer's: ours {ours['peak'] / gib:.2f} GiB vs {peer['peak'] / gib:.2f} GiB "
                  f"({ratios['peak_memory']:.3f}x) -> "
                  f"{'met' if goals['peak_memory_vs_peft_bnb']['met'] else 'NOT met'}")
        else:
            print("GOAL peak memory: not evaluated (CPU debug run)")
        print(f"last-step loss: ours {ours['last_loss']:.4f}, peer {peer['last_loss']:.4f}")
        if "qlora_ext_tune" in ok:
            tuned = ok["qlora_ext_tune"]
            ratios["speed_tune"] = tuned["tokens_per_s"] / peer["tokens_per_s"]
            goals["tokens_per_s_vs_peft_bnb_with_tune"] = {
                "goal": SPEED_GOAL, "value": ratios["speed_tune"], "met": None,
                "info": 'backend "tune": what "auto" would reach by routing on measurements, not what ships'}
            print(f"(info, not a goal) ours with backend \"tune\": {ratios['speed_tune']:.2f}x the peer's tokens/s, "
                  f"last-step loss {tuned['last_loss']:.4f}")
    else:
        why = (f"peft/bitsandbytes not importable ({peer_missing})" if peer_missing
               else "a side failed or was not run")
        print(f"GOALS not evaluated: {why}")
        for key, goal in (("tokens_per_s_vs_peft_bnb", SPEED_GOAL), ("peak_memory_vs_peft_bnb", "<= 1.0")):
            goals[key] = {"goal": goal, "value": None, "met": None, "not_evaluated": why}

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "device": gpu, "versions": versions, "peer_missing": peer_missing,
                       "shape": dataclasses.asdict(shape), "results": results, "ratios": ratios, "goals": goals},
                      f, indent=2)
        print(f"wrote {args.json}")
    return 0 if "qlora_ext" in ok or "qlora_ext" not in sides else 1


if __name__ == "__main__":
    sys.exit(main())
