"""bench/diagnose_fused_cuda.py names layout bugs: it runs here on the CPU ops, with bugs injected into them."""
import os
import sys

import torch

import qlora_ext

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import diagnose_fused_cuda as diag  # noqa: E402

OPS = torch.ops.qlora_ext


class BuggyOps:
    """The two linear ops on the CPU, their output passed through `bug`."""

    def __init__(self, bug):
        self.bug = bug

    def linear_4bit(self, *args):
        return self.bug(OPS.linear_4bit(*args))

    def linear_4bit_grad_input(self, *args):
        return self.bug(OPS.linear_4bit_grad_input(*args))


class MissingStepOps(BuggyOps):
    """The forward without the product of one 64-wide reduction step (a pipeline bug)."""

    def __init__(self, step):
        super().__init__(lambda y: y)
        self.step = step

    def linear_4bit(self, x, *args):
        only_step = torch.zeros_like(x)
        only_step[:, 64 * self.step:64 * self.step + 64] = x[:, 64 * self.step:64 * self.step + 64]
        return OPS.linear_4bit(x, *args) - OPS.linear_4bit(only_step, *args)


def run(ops, direction="fwd", steps=3):
    gen = torch.Generator().manual_seed(0)
    return "\n".join(diag.diagnose(direction, 128, steps, ops, qlora_ext, gen, device="cpu"))


def test_correct_output_is_reported_correct():
    for direction in ("fwd", "bwd"):
        assert "correct (16384 outputs)" in run(BuggyOps(lambda y: y), direction)


def test_swapped_row_groups_show_as_a_row_permutation():
    text = run(BuggyOps(lambda y: torch.cat([y[8:16], y[0:8], y[16:]])))
    assert "by 8-row group: 0.99 0.99 0.00" in text
    assert "rows: 128/128 match some reference rows within 5%; 16 at another index, e.g. 0->8, 1->9" in text
    assert "columns: 0/128 match" in text


def test_permuted_columns_show_as_a_column_permutation():
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(1))
    text = run(BuggyOps(lambda y: y[:, perm]), "bwd")
    assert "columns: 128/128 match some reference columns within 5%" in text
    assert "rows: 0/128 match" in text


def test_a_missing_step_shows_in_the_step_coefficients():
    assert "c = [1.0, 0.0, 1.0] (residual 0.00" in run(MissingStepOps(1))  # bf16 outputs: not exactly 0


def test_non_finite_outputs_are_counted():
    def poison(y):
        y = y.clone()
        y[3, 5] = float("nan")
        return y
    text = run(BuggyOps(poison), steps=1)
    assert "1 non-finite outputs" in text and "1/16384 wrong" in text


def run_partial_tiles(ops, direction="fwd"):
    """The multi-CTA case of main(): M = 257, 2 TN + 64 output columns, 4 steps, NF4 with FP8 absmax."""
    gen = torch.Generator().manual_seed(0)
    return "\n".join(diag.diagnose(direction, 128, 4, ops, qlora_ext, gen, device="cpu", quant_type="nf4",
                                   double_quant=True, m=257, cols=320))


def test_partial_tiles_case_correct_and_with_a_wrong_tail():
    for direction in ("fwd", "bwd"):
        text = run_partial_tiles(BuggyOps(lambda y: y), direction)
        assert f"{direction} TN=128 steps=4 (M=257" in text and "nf4, double quant" in text
        assert "correct (82240 outputs)" in text

    def lose_last_row(y):
        y = y.clone()
        y[256] = 0  # the lone row of the last CTA row
        return y
    assert "wrong rows 256..256 (1 of 257)" in run_partial_tiles(BuggyOps(lose_last_row))

    def double_tail_columns(y):
        y = y.clone()
        y[:, 256:] *= 2  # the partial third column tile
        return y
    text = run_partial_tiles(BuggyOps(double_tail_columns), "bwd")
    assert "wrong rows 0..256 (257 of 257), columns 256..319 (64 of 320); first: [[0, 256]" in text


class LostSplitOps(BuggyOps):
    """The forward without the steps of one split-K split (a split writing nowhere, or the reduce skipping it)."""

    def __init__(self, first_step, last_step):
        super().__init__(lambda y: y)
        self.steps = (first_step, last_step)

    def linear_4bit(self, x, *args):
        lost = torch.zeros_like(x)
        a, b = self.steps
        lost[:, 64 * a:64 * (b + 1)] = x[:, 64 * a:64 * (b + 1)]
        return OPS.linear_4bit(x, *args) - OPS.linear_4bit(lost, *args)


def test_split_k_case_shows_a_lost_split_as_a_run_of_zero_coefficients():
    """main()'s split-K case (M = 65, 200 columns, 64 steps: three splits of 22, 22 and 20 steps)."""
    gen = torch.Generator().manual_seed(0)
    kwargs = dict(device="cpu", quant_type="nf4", double_quant=True, m=65, cols=200)
    text = "\n".join(diag.diagnose("fwd", 128, 64, BuggyOps(lambda y: y), qlora_ext, gen, **kwargs))
    assert "fwd TN=128 steps=64 (M=65, N=200, K=4096, nf4, double quant): correct (13000 outputs)" in text
    text = "\n".join(diag.diagnose("fwd", 128, 64, LostSplitOps(22, 43), qlora_ext, gen, **kwargs))
    coef = [float(c) for c in text.split("c = [")[1].split("]")[0].split(", ")]
    assert len(coef) == 64
    assert all(abs(c) < 0.05 for c in coef[22:44]) and all(abs(c - 1) < 0.05 for c in coef[:22] + coef[44:]), coef
