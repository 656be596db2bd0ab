"""Code that otherwise runs only on a GPU, exercised here on the CPU with stand-ins (a CPU "managed arena",
fake CUDA queries) or on synthetic inputs: the paged optimizers' arena checkpoints, the GPU check's report
and shell script, the CUDA benchmarks' argument parsing and the study's GPU item. The GPU session is short;
each test here pins a bug that would otherwise have been found there."""
import io
import json
import os
import subprocess
import sys

import pytest
import torch

from qlora_ext import PagedAdamW, PagedAdamW8bit
from tests.test_optim import groups_of, make_grads, make_params
from tests.test_optim_8bit import _CpuArenaC

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _arena_mode(monkeypatch, cls):
    """Makes cls allocate its states in a CPU stand-in for the managed arena (the CUDA code path)."""
    import qlora_ext.optim as optim_module

    monkeypatch.setattr(optim_module, "_C", _CpuArenaC(optim_module._C))
    monkeypatch.setattr(cls, "_uses_arena", lambda self, device: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def _run(opt, params, steps, start=0):
    for s in range(start, start + steps):
        for p, g in zip(params, make_grads(params, s)):
            p.grad = g
        opt.step()


# ---- paged optimizers: checkpoints of arena states ----------------------------------------------------
@pytest.mark.parametrize("cls", [PagedAdamW, PagedAdamW8bit])
def test_arena_state_dict_saves_with_torch_save_and_resumes(cls, monkeypatch):
    """On CUDA the states are views of one managed uint8 arena; PagedAdamW8bit's hold uint8 codes and float32
    absmax, and torch.save refuses tensors of two dtypes viewing one storage ("Cannot save multiple tensors
    or storages that view the same data as different types"): the trainer's first checkpoint with
    --optimizer paged_adamw8bit would have failed on the GPU."""
    shapes = [(4096,), (300, 70), (97,)]
    _arena_mode(monkeypatch, cls)
    params = make_params(shapes, torch.bfloat16, "cpu")
    opt = cls(groups_of(params))
    _run(opt, params, 3)
    assert len(opt._arenas) == 1
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    # resume into a fresh optimizer (arena too) and continue: bit for bit the same as the original
    params2 = [p.detach().clone().requires_grad_() for p in params]
    opt2 = cls(groups_of(params2))
    opt2.load_state_dict(sd)
    _run(opt, params, 2, start=3)
    _run(opt2, params2, 2, start=3)
    for a, b in zip(params, params2):
        assert torch.equal(a, b)
        for k, v in opt.state[a].items():
            assert torch.equal(v, opt2.state[b][k]), k


def test_8bit_arena_state_dict_copies_do_not_alias_the_arena(monkeypatch):
    _arena_mode(monkeypatch, PagedAdamW8bit)
    params = make_params([(4096,), (97,)], torch.float32, "cpu")
    opt = PagedAdamW8bit(params)
    _run(opt, params, 1)
    sd = opt.state_dict()
    (arena,) = opt._arenas
    for s in sd["state"].values():
        for n, v in s.items():
            if n != "step":
                assert v.untyped_storage().data_ptr() != arena.untyped_storage().data_ptr(), n
    assert sd["state"][0]["state1"].stride() == params[0].stride()
    dense = opt.dense_state_dict()  # goes through state_dict() as well
    assert dense["state"][0]["exp_avg"].dtype == torch.float32
