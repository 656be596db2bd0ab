#!/usr/bin/env python3
"""Diagnoses the fused large-M CUDA GEMMs (wgmma on Hopper, or mma.sync) in terms of their data layout.

bench/gpu_check.sh runs it when the wgmma smoke test fails, so that the one short GPU session says *how* the
kernel is wrong, not only that it is: for one CTA tile (M = 128 rows, TN output columns) and one or three
main-loop steps (64 or 192 reduction values), forward y = x W^T and input gradient dx = dy W, it prints
- how many output elements are wrong (|out - ref| > 2% of the reference's RMS), and where: by warpgroup
  (rows / 64), by 8-row group within it, by 8-column group, by 64-column block;
- a row map and a column map: for each output row (column), the reference row (column) it matches best and
  how well; a permutation points at the A layout, the accumulator map or the epilogue, a mix at B;
- per-step coefficients: out ~ sum_s c_s ref_s by least squares, with ref_s the product of step s alone
  (all c_s = 1 when right; a 0 or 2 points at the pipeline's stage or buffer indexing).
Weights are Int4 without double quantization (exact absmax), activations bf16 in [-2, 2]; the reference is
computed in float64 from the dequantized weight. Then, per tile width, two cases of several CTAs with partial
tiles (M = 257, 2 TN + 64 output columns, 4 steps) and NF4 weights with FP8 absmax (the training format), and
two of split-K (M = 65, 200 output columns, 64 steps: three splits of the reduction and the reduce kernel): the
wrong count, where, and the per-step coefficients. Each case's name is printed before it runs.

    python bench/diagnose_fused_cuda.py                     # backend "fused", both tile widths on Hopper
    python bench/diagnose_fused_cuda.py --backend fused_mma
Exits 2 without a CUDA GPU; otherwise 0 (it diagnoses, the tests judge).
"""
from __future__ import annotations

import argparse
import sys

import torch


def stats_by(mask: torch.Tensor, size: int, axis: int) -> str:
    """Wrong fraction per block of `size` rows (axis 0) or columns (axis 1)."""
    blocks = mask.float().unflatten(axis, (-1, size)).mean(dim=(1, 2) if axis == 0 else (0, 2))
    return " ".join(f"{v:.2f}" for v in blocks.tolist())


def best_match(out: torch.Tensor, ref: torch.Tensor) -> tuple[list[int], list[float]]:
    """For each row of out, the index of the reference row closest to it and the relative residual."""
    d = torch.cdist(out, ref)
    norms = ref.norm(dim=1).clamp_min(1e-12)
    best = d.argmin(dim=1)
    return best.tolist(), (d.gather(1, best[:, None]).squeeze(1) / norms[best]).tolist()


def describe_map(out: torch.Tensor, ref: torch.Tensor, what: str) -> str:
    idx, res = best_match(out, ref)
    n = len(idx)
    good = [i for i in range(n) if res[i] < 0.05]
    moved = [(i, idx[i]) for i in good if idx[i] != i]
    text = f"{what}: {len(good)}/{n} match some reference {what} within 5%"
    if good and not moved:
        text += ", all at their own index"
    if moved:
        text += f"; {len(moved)} at another index, e.g. " + ", ".join(f"{i}->{j}" for i, j in moved[:12])
    bad = [i for i in range(n) if res[i] >= 0.05]
    if bad:
        text += f"; unmatched: {bad[:16]}{' ...' if len(bad) > 16 else ''}"
    return text


def case_name(direction: str, tile_n: int, steps: int, quant_type="int4", double_quant=False, m=128,
              cols=None) -> str:
    cols = tile_n if cols is None else cols
    n, k = (cols, 64 * steps) if direction == "fwd" else (64 * steps, cols)
    return (f"{direction} TN={tile_n} steps={steps} (M={m}, N={n}, K={k}"
            f"{'' if quant_type == 'int4' and not double_quant else ', ' + quant_type}"
            f"{', double quant' if double_quant else ''})")


def diagnose(direction: str, tile_n: int, steps: int, ops, qlora_ext, gen, device="cuda", quant_type="int4",
             double_quant=False, m=128, cols=None) -> list[str]:
    """The diagnosis of one case, as lines of text (ops: torch.ops.qlora_ext or a stand-in with its two ops).
    The defaults are one CTA tile (M = 128, TN output columns); m and cols (output columns) other than those
    make several CTAs with partial tiles, where only the counts, the first wrong positions and the per-step
    coefficients are given."""
    r = 64 * steps
    cols = tile_n if cols is None else cols
    n, k = (cols, r) if direction == "fwd" else (r, cols)
    w = torch.randn(n, k, generator=gen, device=device)
    q = qlora_ext.quantize(w, blocksize=64, quant_type=quant_type, double_quant=double_quant)
    w_ref = qlora_ext.dequantize(q, torch.float32).double()
    qa = (q.codes, q.absmax, q.absmax_scale, q.absmax_mean)
    act = (torch.randint(-4, 5, (m, r), generator=gen, device=device) / 2).to(torch.bfloat16)
    a64 = act.double()
    if direction == "fwd":
        out = ops.linear_4bit(act, *qa, None, 64, quant_type, n)
        ref = a64 @ w_ref.t()
        parts = [a64[:, 64 * s:64 * s + 64] @ w_ref[:, 64 * s:64 * s + 64].t() for s in range(steps)]
    else:
        out = ops.linear_4bit_grad_input(act, *qa, 64, quant_type, k)
        ref = a64 @ w_ref
        parts = [a64[:, 64 * s:64 * s + 64] @ w_ref[64 * s:64 * s + 64] for s in range(steps)]
    out = out.double().cpu()
    ref, parts = ref.cpu(), [x.cpu() for x in parts]
    rms = ref.pow(2).mean().sqrt().item()
    finite = torch.isfinite(out)
    wrong = ~finite | ((out - ref).abs() > 0.02 * rms)
    head = case_name(direction, tile_n, steps, quant_type, double_quant, m, cols)
    lines = []
    if not finite.all():
        lines.append(f"{head}: {int((~finite).sum())} non-finite outputs")
        out = torch.where(finite, out, torch.zeros_like(out))
    if not wrong.any():
        return lines + [f"{head}: correct ({out.numel()} outputs)"]
    lines.append(f"{head}: {int(wrong.sum())}/{out.numel()} wrong; out rms {out.pow(2).mean().sqrt().item():.3g}, "
                 f"ref rms {rms:.3g}")
    if m != 128 or cols != tile_n:  # several CTAs, partial tiles: where, and which steps
        where = wrong.nonzero().tolist()
        rows, wcols = sorted({i for i, _ in where}), sorted({j for _, j in where})
        lines.append(f"  wrong rows {rows[0]}..{rows[-1]} ({len(rows)} of {m}), columns {wcols[0]}..{wcols[-1]} "
                     f"({len(wcols)} of {out.shape[1]}); first: {where[:8]}")
        lines.append("  " + step_coefficients(parts, out))
        return lines
    lines += [f"  wrong by warpgroup (64 rows): {stats_by(wrong, 64, 0)}",
              f"  by 8-row group: {stats_by(wrong, 8, 0)}",
              f"  by 8-column group: {stats_by(wrong, 8, 1)}"]
    if out.shape[1] >= 128:
        lines.append(f"  by 64-column block: {stats_by(wrong, 64, 1)}")
    lines.append("  " + describe_map(out, ref, "rows"))
    lines.append("  " + describe_map(out.t().contiguous(), ref.t().contiguous(), "columns"))
    lines.append("  " + step_coefficients(parts, out))
    return lines


def step_coefficients(parts: list, out: torch.Tensor) -> str:
    """out ~ sum_s c_s ref_s by least squares (all c_s = 1 when right)."""
    basis = torch.stack([p.flatten() for p in parts], dim=1)
    coef = torch.linalg.lstsq(basis, out.flatten()[:, None]).solution.flatten()
    fit = (basis @ coef - out.flatten()).norm() / out.flatten().norm().clamp_min(1e-12)
    return f"out ~ sum_s c_s ref_s: c = {[round(c, 3) for c in coef.tolist()]} (residual {fit.item():.3f})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="fused", choices=["fused", "fused_mma"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("diagnose_fused_cuda: no CUDA device", file=sys.stderr)
        return 2
    import qlora_ext

    ops = torch.ops.qlora_ext
    qlora_ext.set_linear_backend(args.backend)
    kernel = "mma.sync" if args.backend == "fused_mma" else qlora_ext.fused_large_kernel()
    print(f"diagnose_fused_cuda: backend {args.backend} -> {kernel} large-M kernels on "
          f"{torch.cuda.get_device_name()}")
    tiles = (128, 256) if kernel == "wgmma" else (128,)
    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    # one CTA tile with 1 and 3 main-loop steps (layouts, pipeline), then several CTAs with partial tiles and
    # the weight format of training (NF4, FP8 absmax): tails, multi-CTA indexing, the absmax decode
    cases = [dict(direction=d, steps=s) for d in ("fwd", "bwd") for s in (1, 3)]
    cases += [dict(direction=d, steps=4, quant_type="nf4", double_quant=True, m=257) for d in ("fwd", "bwd")]
    # split-K: 1-2 CTAs over 64 steps at M = 65 split 3 ways (the partial sums' traffic cap, 4096 / (16 * 65));
    # a wrong split shows as a run of per-step coefficients other than 1
    cases += [dict(direction=d, steps=64, quant_type="nf4", double_quant=True, m=65, cols=200)
              for d in ("fwd", "bwd")]
    try:
        for tile_n in tiles:
            qlora_ext._C.set_hopper_tile_n(tile_n)
            for case in cases:
                if "m" in case and "cols" not in case:
                    case = dict(case, cols=2 * tile_n + 64)
                # the name first: a case that hangs or faults is then known by it
                print(f"-- {case_name(tile_n=tile_n, **case)}", flush=True)
                print("\n".join(diagnose(tile_n=tile_n, ops=ops, qlora_ext=qlora_ext, gen=gen, **case)), flush=True)
    except RuntimeError as e:  # a device fault is sticky: nothing after it can run in this process
        print(f"diagnose_fused_cuda: stopped by {type(e).__name__}: {str(e).splitlines()[0]}")
    finally:
        qlora_ext._C.set_hopper_tile_n(0)
        qlora_ext.set_linear_backend("auto")
    return 0


if __name__ == "__main__":
    sys.exit(main())
