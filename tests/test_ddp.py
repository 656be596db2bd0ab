"""DistributedDataParallel on a prepared model, two CPU processes over gloo: the adapters' gradients are averaged
and the ranks stay identical, and the 4-bit base is never broadcast (a buffer DDP would otherwise send from rank
0 before every training forward: the whole base model per micro-batch)."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from qlora_ext import LoRALinear, prepare_model

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)   # the same base and starting adapters on both ranks
        model = prepare_model(nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)), r=4, dropout=0.0)
        ddp = nn.parallel.DistributedDataParallel(model)   # broadcast_buffers=True, the default
        codes = model[0].base.weight_codes
        if rank == 1:   # a change rank 0 does not have: a broadcast of the base would undo it
            codes.add_(1)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        torch.manual_seed(1 + rank)   # each rank its own batch
        for _ in range(2):
            x = torch.randn(5, 64)
            ddp(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        results[rank] = {"codes": codes.clone(), "adapters": [p.detach().clone() for p in model.parameters()
                                                              if p.requires_grad]}
    finally:
        dist.destroy_process_group()


def test_ddp_averages_adapter_gradients_and_never_broadcasts_the_4bit_base():
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(_free_port(), results), nprocs=2, join=True)
        r0, r1 = results[0], results[1]
    assert all(torch.equal(a, b) for a, b in zip(r0["adapters"], r1["adapters"]))   # gradients averaged
    assert len(r0["adapters"]) == 4 and r0["adapters"][1].abs().sum() > 0   # lora_B of layer 0 trained
    assert torch.equal(r1["codes"], r0["codes"] + 1)   # rank 1's base kept: never broadcast


def test_the_ignore_list_names_every_4bit_buffer_and_keeps_what_was_there():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    model._ddp_params_and_buffers_to_ignore = ["1.bias"]
    prepare_model(model, r=2, target_modules=["0"])
    buffers = {n for n, _ in model.named_buffers() if n.startswith("0.base.")}
    assert buffers and set(model._ddp_params_and_buffers_to_ignore) == buffers | {"1.bias"}
    assert isinstance(model[0], LoRALinear)
    prepare_model(model, r=2, target_modules=["1"])   # again: the new layer's buffers added, none twice
    ignored = model._ddp_params_and_buffers_to_ignore
    assert len(ignored) == len(set(ignored)) and {n for n, _ in model.named_buffers() if ".base." in n} <= set(ignored)
