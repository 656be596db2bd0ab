"""torch.library.opcheck on every op (schema, fake/meta implementation, dispatch), QuantState moves,
and a torch.compile(fullgraph=True) graph through dequantize."""
import pytest
import torch

import qlora_ext
from tests.conftest import DEVICES

ops = torch.ops.qlora_ext


def sample_args(device):
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for shape in ((1,), (65,), (7, 129)):
            x = torch.randn(shape, generator=g).to(dtype).to(device)
            for quant_type in ("nf4", "fp4", "int4"):
                yield x, quant_type


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_quantize_ops(device):
    for x, quant_type in sample_args(device):
        torch.library.opcheck(ops.quantize_4bit, (x, 64, quant_type))
        _, absmax, _ = ops.quantize_4bit(x, 64, quant_type)
        torch.library.opcheck(ops.quantize_absmax_fp8, (absmax,))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_dequantize_ops(device):
    for x, quant_type in sample_args(device):
        for double_quant in (False, True):
            q = qlora_ext.quantize(x, quant_type=quant_type, double_quant=double_quant)
            args = (q.codes, q.absmax, q.absmax_scale, q.absmax_mean, 64, quant_type, list(x.shape), x.dtype)
            torch.library.opcheck(ops.dequantize_4bit, args)
            if double_quant:
                torch.library.opcheck(ops.dequantize_absmax_fp8, (q.absmax, q.absmax_scale, q.absmax_mean))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_dequantize(device):
    w = torch.randn(96, 128, device=device)
    q = qlora_ext.quantize(w, double_quant=True)

    def f(x):
        return x @ qlora_ext.dequantize(q, torch.float32).t()

    x = torch.randn(5, 128, device=device)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), f(x), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_quant_state_moves_without_requantizing(device):
    w = torch.randn(33, 64, dtype=torch.bfloat16)
    q = qlora_ext.quantize(w)
    moved = q.to(device)
    assert moved.device.type == device
    assert torch.equal(qlora_ext.dequantize(moved).cpu(), qlora_ext.dequantize(q))
    assert all(torch.equal(a.cpu(), b) for a, b in zip(moved.tensors().values(), q.tensors().values()))
