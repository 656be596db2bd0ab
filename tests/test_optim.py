"""PagedAdamW against torch.optim.AdamW: 50 steps on random problems (fp32 within 1e-6 relative, bf16
within one bf16 ulp of torch's AdamW run on fp32 copies and rounded to bf16 after each step), several
param groups, zero and missing gradients, state_dict round trips and cross-loading both ways, bad
inputs; on CUDA also bit-equality with the CPU kernel, paging (page_out -> step gives the resident
result), no host synchronization in step(), and the managed arena freed with the optimizer."""
import copy
import gc
import io

import pytest
import torch

import qlora_ext
from qlora_ext import PagedAdamW, _C
from tests.conftest import DEVICES, HAS_CUDA

ops = torch.ops.qlora_ext
needs_cuda = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build")]

# Awkward sizes: scalars-as-[1], vector tails (not multiples of 8 or 4), more than one CPU chunk (16384)
# and CUDA chunk (4096), a tensor of many chunks split over threads.
SHAPES = [(1,), (97,), (33, 65), (4096 + 3,), (300, 70), (70001,)]
STEPS = 50


def make_params(shapes, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype).to(device).requires_grad_() for s in shapes]


def make_grads(params, step, seed=1, scale=1.0):
    """Gradients that do not depend on the parameters (so two runs see the same ones), of varying scale."""
    g = torch.Generator().manual_seed(seed * 100003 + step)
    return [(torch.randn(p.shape, generator=g) * scale * 10.0 ** (i % 3 - 1)).to(p.dtype).to(p.device)
            for i, p in enumerate(params)]


def groups_of(params):
    """Three groups with different lr and weight decay (one without decay)."""
    return [{"params": params[0::3], "lr": 1e-2, "weight_decay": 0.1},
            {"params": params[1::3], "lr": 3e-3, "weight_decay": 0.0},
            {"params": params[2::3]}]


def assert_close_fp32(got, want, rtol=1e-6):
    """Within rtol relative, elements near zero relative to the tensor's scale."""
    got, want = got.detach().cpu(), want.detach().cpu()
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs().max()))


def run_both(ours, theirs, p_ours, p_theirs, steps=STEPS, scale=1.0, start=0):
    for s in range(start, start + steps):
        for ps in (p_ours, p_theirs):
            for p, g in zip(ps, make_grads(ps, s, scale=scale)):
                p.grad = g
        ours.step()
        theirs.step()


@pytest.mark.parametrize("device", DEVICES)
def test_fp32_matches_torch_adamw_with_param_groups(device):
    p_ours = make_params(SHAPES, torch.float32, device)
    p_torch = [p.detach().clone().requires_grad_() for p in p_ours]
    ours = PagedAdamW(groups_of(p_ours), lr=1e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2)
    theirs = torch.optim.AdamW(groups_of(p_torch), lr=1e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2,
                               foreach=True)
    run_both(ours, theirs, p_ours, p_torch)
    for a, b in zip(p_ours, p_torch):
        assert_close_fp32(a, b)
        sa, sb = ours.state[a], theirs.state[b]
        assert float(sa["step"]) == float(sb["step"]) == STEPS
        assert_close_fp32(sa["exp_avg"], sb["exp_avg"])
        assert_close_fp32(sa["exp_avg_sq"], sb["exp_avg_sq"], rtol=1e-5)
        assert sa["exp_avg"].device == a.device and sa["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("maximize", [False, True])
def test_fp32_options_lerp_branch_and_maximize(device, maximize):
    """beta1 < 0.5 takes torch's other lerp formula; maximize flips the gradient."""
    p_ours = make_params([(1000,), (33,)], torch.float32, device, seed=3)
    p_torch = [p.detach().clone().requires_grad_() for p in p_ours]
    ours = PagedAdamW(p_ours, lr=2e-2, betas=(0.3, 0.9), maximize=maximize)
    theirs = torch.optim.AdamW(p_torch, lr=2e-2, betas=(0.3, 0.9), maximize=maximize, foreach=True)
    run_both(ours, theirs, p_ours, p_torch, steps=20)
    for a, b in zip(p_ours, p_torch):
        assert_close_fp32(a, b)


def bf16_ulp(x):
    """One bf16 ulp at each element of x (8 significant bits); the smallest normal's ulp at 0."""
    _, e = torch.frexp(x.float())
    return torch.ldexp(torch.ones_like(x, dtype=torch.float32), (e - 8).clamp(min=-133))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16bit_params_within_one_ulp_of_fp32_reference(device, dtype):
    """The reference of the issue: torch's AdamW on fp32 copies, the copy re-initialised from the rounded
    16-bit parameter before each step and rounded back after it (fp32 states carried across steps)."""
    p_ours = make_params(SHAPES, dtype, device)
    ref32 = [p.detach().float().requires_grad_() for p in p_ours]
    ours = PagedAdamW(groups_of(p_ours), lr=1e-3, weight_decay=1e-2)
    theirs = torch.optim.AdamW(groups_of(ref32), lr=1e-3, weight_decay=1e-2, foreach=True)
    ref16 = [p.detach().clone() for p in p_ours]
    for s in range(STEPS):
        grads = make_grads(p_ours, s)
        for p, g in zip(p_ours, grads):
            p.grad = g
        ours.step()
        with torch.no_grad():
            for r32, r16, g in zip(ref32, ref16, grads):
                r32.copy_(r16.float())
                r32.grad = g.float()
        theirs.step()
        with torch.no_grad():
            for r32, r16 in zip(ref32, ref16):
                r16.copy_(r32.to(dtype))
    for a, want in zip(p_ours, ref16):
        assert a.dtype == dtype
        a32, w32 = a.detach().float().cpu(), want.float().cpu()
        ulp = bf16_ulp(w32) if dtype == torch.bfloat16 else torch.maximum(
            torch.ldexp(torch.ones_like(w32), torch.frexp(w32)[1] - 11), torch.full_like(w32, 2.0 ** -24))
        assert bool(((a32 - w32).abs() <= ulp).all()), float(((a32 - w32).abs() / ulp).max())
    for a in p_ours:
        assert ours.state[a]["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
def test_zero_gradients_only_decay(device):
    p_ours = make_params([(257,), (16, 16)], torch.float32, device)
    p_torch = [p.detach().clone().requires_grad_() for p in p_ours]
    ours = PagedAdamW(p_ours, lr=1e-2, weight_decay=0.5)
    theirs = torch.optim.AdamW(p_torch, lr=1e-2, weight_decay=0.5, foreach=True)
    run_both(ours, theirs, p_ours, p_torch, steps=10, scale=0.0)
    for a, b in zip(p_ours, p_torch):
        assert_close_fp32(a, b)
        assert bool((ours.state[a]["exp_avg"] == 0).all()) and bool((ours.state[a]["exp_avg_sq"] == 0).all())


@pytest.mark.parametrize("device", DEVICES)
def test_none_grads_are_skipped(device):
    p_ours = make_params([(100,), (50,), (7,)], torch.float32, device)
    p_torch = [p.detach().clone().requires_grad_() for p in p_ours]
    ours, theirs = PagedAdamW(p_ours), torch.optim.AdamW(p_torch, foreach=True)
    for s in range(12):
        for ps in (p_ours, p_torch):
            for i, (p, g) in enumerate(zip(ps, make_grads(ps, s))):
                p.grad = None if (i == 1 and s % 3 == 0) or i == 2 else g
        ours.step()
        theirs.step()
    for a, b in zip(p_ours, p_torch):
        assert_close_fp32(a, b)
    assert float(ours.state[p_ours[1]]["step"]) == 8
    assert p_ours[2] not in ours.state  # never had a gradient: no state, as in torch
    assert set(ours.state_dict()["state"]) == set(theirs.state_dict()["state"])


def save_load(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("device", DEVICES)
def test_state_dict_round_trip_resumes_exactly(device):
    p_a = make_params(SHAPES[:4], torch.bfloat16, device)
    p_b = [p.detach().clone().requires_grad_() for p in p_a]
    opt_a = PagedAdamW(groups_of(p_a), lr=1e-3)
    run_both(opt_a, torch.optim.SGD([torch.zeros(1, requires_grad=True)]), p_a, [], steps=5)
    sd = save_load(opt_a.state_dict())
    assert sd["state"][0]["exp_avg"].dtype == torch.float32 and sd["state"][0]["step"].dtype == torch.float32
    with torch.no_grad():
        for a, b in zip(p_a, p_b):
            b.copy_(a)
    opt_b = PagedAdamW(groups_of(p_b), lr=1e-3)
    opt_b.load_state_dict(sd)
    assert opt_b.param_groups[1]["lr"] == 3e-3
    run_both(opt_a, opt_b, p_a, p_b, steps=5, start=5)
    for a, b in zip(p_a, p_b):
        assert torch.equal(a, b)
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt_a.state[a][k], opt_b.state[b][k])
            assert opt_b.state[b][k].device == b.device


@pytest.mark.parametrize("device", DEVICES)
def test_cross_loading_with_torch_adamw_fp32_is_lossless(device):
    p_t = make_params(SHAPES[:4], torch.float32, device)
    torch_opt = torch.optim.AdamW(groups_of(p_t), lr=1e-3, foreach=True)
    run_both(torch_opt, torch.optim.SGD([torch.zeros(1, requires_grad=True)]), p_t, [], steps=4)
    # torch -> ours
    p_o = [p.detach().clone().requires_grad_() for p in p_t]
    ours = PagedAdamW(groups_of(p_o), lr=1e-3)
    ours.load_state_dict(save_load(torch_opt.state_dict()))
    for a, b in zip(p_o, p_t):
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(ours.state[a][k], torch_opt.state[b][k])
        assert float(ours.state[a]["step"]) == 4 and ours.state[a]["step"].device.type == "cpu"
    run_both(ours, torch_opt, p_o, p_t, steps=6, start=4)
    for a, b in zip(p_o, p_t):
        assert_close_fp32(a, b)
    # ours -> torch
    p_t2 = [p.detach().clone().requires_grad_() for p in p_o]
    torch_opt2 = torch.optim.AdamW(groups_of(p_t2), lr=1e-3, foreach=True)
    torch_opt2.load_state_dict(save_load(ours.state_dict()))
    for a, b in zip(p_o, p_t2):
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(ours.state[a][k].cpu(), torch_opt2.state[b][k].cpu())
        assert float(torch_opt2.state[b]["step"]) == 10
    run_both(ours, torch_opt2, p_o, p_t2, steps=5, start=10)
    for a, b in zip(p_o, p_t2):
        assert_close_fp32(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_cross_loading_with_torch_adamw_bf16(device):
    """torch keeps bf16 states for bf16 parameters: we upcast them on load, torch casts ours down."""
    p_t = make_params(SHAPES[:3], torch.bfloat16, device)
    torch_opt = torch.optim.AdamW(p_t, foreach=True)
    run_both(torch_opt, torch.optim.SGD([torch.zeros(1, requires_grad=True)]), p_t, [], steps=3)
    ours = PagedAdamW([p.detach().clone().requires_grad_() for p in p_t])
    ours.load_state_dict(torch_opt.state_dict())
    for a, b in zip(ours.param_groups[0]["params"], p_t):
        assert ours.state[a]["exp_avg"].dtype == torch.float32
        assert torch.equal(ours.state[a]["exp_avg"], torch_opt.state[b]["exp_avg"].float())
    torch_opt2 = torch.optim.AdamW([p.detach().clone().requires_grad_() for p in p_t], foreach=True)
    torch_opt2.load_state_dict(ours.state_dict())
    for a, b in zip(ours.param_groups[0]["params"], torch_opt2.param_groups[0]["params"]):
        assert torch_opt2.state[b]["exp_avg"].dtype == torch.bfloat16
        assert torch.equal(torch_opt2.state[b]["exp_avg"], ours.state[a]["exp_avg"].to(torch.bfloat16))


def test_cpu_simd_and_scalar_paths_same_bits():
    results = []
    for simd in (True, False):
        _C.set_cpu_simd(simd)
        try:
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                ps = make_params(SHAPES, dtype, "cpu")
                opt = PagedAdamW(groups_of(ps))
                run_both(opt, torch.optim.SGD([torch.zeros(1, requires_grad=True)]), ps, [], steps=3)
                results.append([p.detach().clone() for p in ps] + [opt.state[p]["exp_avg_sq"] for p in ps])
        finally:
            _C.set_cpu_simd(True)
    half = len(results) // 2
    for a_list, b_list in zip(results[:half], results[half:]):
        for a, b in zip(a_list, b_list):
            assert torch.equal(a, b)


def test_channels_last_param_and_mismatched_grad_layout():
    p = torch.randn(2, 3, 5, 7).to(memory_format=torch.channels_last).requires_grad_()
    q = p.detach().clone().requires_grad_()
    ours, theirs = PagedAdamW([p]), torch.optim.AdamW([q], foreach=True)
    for s in range(3):
        g = torch.randn(2, 3, 5, 7)  # contiguous: not the parameter's layout
        p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    assert ours.state[p]["exp_avg"].stride() == p.stride()
    assert_close_fp32(p, q)


def test_opcheck_adamw_step():
    ps = make_params([(65,), (7, 9)], torch.bfloat16, "cpu")
    args = (ps, make_grads(ps, 0), [torch.zeros(p.shape) for p in ps], [torch.zeros(p.shape) for p in ps],
            [torch.tensor(0.0) for _ in ps], 1e-3, 0.9, 0.999, 1e-8, 1e-2, False)
    torch.library.opcheck(ops.adamw_step_, args, test_utils=("test_schema", "test_faketensor"))


# ---- bad input ------------------------------------------------------------------------------------
def test_sparse_gradients_are_rejected():
    p = torch.zeros(10, 3, requires_grad=True)
    opt = PagedAdamW([p])
    p.grad = torch.sparse_coo_tensor(torch.tensor([[0, 4]]), torch.ones(2, 3), (10, 3),
                                     check_invariants=True)
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


def test_complex_and_integer_params_are_rejected():
    with pytest.raises(TypeError, match="complex parameters"):
        PagedAdamW([torch.zeros(4, dtype=torch.complex64, requires_grad=True)])
    with pytest.raises(TypeError, match="float32, float16 or bfloat16, got torch.float64"):
        PagedAdamW([torch.zeros(4, dtype=torch.float64, requires_grad=True)])


def test_mixed_devices_are_rejected():
    with pytest.raises(ValueError, match="all parameters on one device"):
        PagedAdamW([torch.zeros(4, requires_grad=True), torch.zeros(4, device="meta", requires_grad=True)])
    with pytest.raises(ValueError, match="all parameters on one device"):
        PagedAdamW([{"params": [torch.zeros(4, requires_grad=True)]},
                    {"params": [torch.zeros(4, device="meta", requires_grad=True)]}])


def test_bad_hyperparameters():
    p = [torch.zeros(4, requires_grad=True)]
    for kwargs, msg in [({"lr": -1.0}, "lr must be"), ({"betas": (1.0, 0.9)}, "betas must be"),
                        ({"eps": -1e-8}, "eps must be"), ({"weight_decay": -0.1}, "weight_decay must be"),
                        ({"amsgrad": True}, "amsgrad")]:
        with pytest.raises(ValueError, match=msg):
            PagedAdamW(p, **kwargs)


def test_op_errors_name_the_argument():
    p = torch.zeros(4)
    z = torch.zeros(4)
    s = torch.tensor(0.0)
    with pytest.raises(TypeError, match=r"grads\[0\] must have params\[0\]'s dtype"):
        ops.adamw_step_([p], [z.double()], [z], [z], [s], 1e-3, 0.9, 0.999, 1e-8, 0.0, False)
    with pytest.raises(ValueError, match=r"exp_avgs\[0\] must have params\[0\]'s shape"):
        ops.adamw_step_([p], [z], [torch.zeros(5)], [z], [s], 1e-3, 0.9, 0.999, 1e-8, 0.0, False)
    with pytest.raises(TypeError, match=r"exp_avg_sqs\[0\] must be Float"):
        ops.adamw_step_([p], [z], [z], [z.half()], [s], 1e-3, 0.9, 0.999, 1e-8, 0.0, False)
    with pytest.raises(TypeError, match=r"steps\[0\] must be Float"):
        ops.adamw_step_([p], [z], [z], [z], [torch.tensor(0)], 1e-3, 0.9, 0.999, 1e-8, 0.0, False)
    with pytest.raises(ValueError, match="same length"):
        ops.adamw_step_([p], [z], [z], [z], [], 1e-3, 0.9, 0.999, 1e-8, 0.0, False)
    with pytest.raises(ValueError, match="beta2 must be in"):
        ops.adamw_step_([p], [z], [z], [z], [s], 1e-3, 0.9, 1.5, 1e-8, 0.0, False)
    assert float(s) == 0.0  # a rejected call changes nothing


def test_load_rejects_non_adamw_state():
    p = torch.zeros(4, requires_grad=True)
    sgd = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.ones(4)
    sgd.step()
    with pytest.raises(ValueError, match="not an AdamW state dict"):
        PagedAdamW([p]).load_state_dict(sgd.state_dict())


def test_cpu_paging_is_a_no_op():
    p = torch.zeros(4, requires_grad=True)
    opt = PagedAdamW([p])
    p.grad = torch.ones(4)
    opt.step()
    assert opt.page_out() is False and opt.page_in() is False and opt.state_location() == []


# ---- CUDA only ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("paged", [True, False])
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build")
def test_cuda_matches_cpu_bit_for_bit(dtype, paged):
    """Both kernels round every operation of adamw_core.h the same way."""
    shapes = SHAPES + [(64, 4096)] * 20 + [(11008, 64)] * 5  # many LoRA-like tensors in one launch
    p_cpu = make_params(shapes, dtype, "cpu")
    p_gpu = [p.detach().cuda().requires_grad_() for p in p_cpu]
    opt_cpu, opt_gpu = PagedAdamW(groups_of(p_cpu)), PagedAdamW(groups_of(p_gpu), paged=paged)
    run_both(opt_cpu, opt_gpu, p_cpu, p_gpu, steps=5)
    for a, b in zip(p_cpu, p_gpu):
        assert torch.equal(a, b.cpu())
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt_cpu.state[a][k], opt_gpu.state[b][k].cpu())
    assert len(opt_gpu._arenas) == (1 if paged else 0)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build")
def test_cuda_unaligned_params_take_the_scalar_path():
    base = torch.randn(3 * 4099 + 1, device="cuda")
    p_gpu = base[1:].view(3, 4099).requires_grad_()  # 4-byte offset: no 16-byte vectors
    p_cpu = p_gpu.detach().cpu().requires_grad_()
    opt_gpu, opt_cpu = PagedAdamW([p_gpu]), PagedAdamW([p_cpu])
    run_both(opt_cpu, opt_gpu, [p_cpu], [p_gpu], steps=3)
    assert torch.equal(p_cpu, p_gpu.detach().cpu())


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build")
def test_cuda_states_are_cuda_tensors_in_one_managed_arena():
    ps = make_params([(1000,), (64, 257), (3,)], torch.bfloat16, "cuda")
    opt = PagedAdamW(ps)
    run_both(opt, torch.optim.SGD([torch.zeros(1, requires_grad=True)]), ps, [], steps=1)
    (arena,) = opt._arenas
    lo, hi = arena.data_ptr(), arena.data_ptr() + arena.numel()
    for p in ps:
        for k in ("exp_avg", "exp_avg_sq"):
            t = opt.state[p][k]
            assert t.device == p.device and t.dtype == torch.float32 and t.shape == p.shape
            assert lo <= t.data_ptr() and t.data_ptr() + 4 * t.numel() <= hi
            assert t.data_ptr() % 256 == 0


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build")
@pytest.mark.parametrize("optimizer", ["PagedAdamW", "PagedAdamW8bit"])
def test_cuda_page_out_then_step_matches_resident(optimizer):
    cls = getattr(qlora_ext.optim, optimizer)
    p_res = make_params([(4096, 64)] * 8 + [(1000,)], torch.bfloat16, "cuda")
    p_pag = [p.detach().clone().requires_grad_() for p in p_res]
    resident, paged = cls(p_res), cls(p_pag)
    moved = False
    for s in range(6):
        for ps in (p_res, p_pag):
            for p, g in zip(ps, make_grads(ps, s)):
                p.grad = g
        resident.step()
        if s % 2 == 0:
            moved = paged.page_out()
            if moved:
                assert paged.state_location() == [-1]
            if s == 2:
                paged.page_in()
        paged.step()
        if moved:
            assert paged.state_location() == [p_pag[0].device.index]
    for a, b in zip(p_res, p_pag):
        assert torch.equal(a, b)
        for k in resident.state[a]:
            assert torch.equal(resident.state[a][k], paged.state[b][k])


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build")
@pytest.mark.parametrize("optimizer", ["PagedAdamW", "PagedAdamW8bit"])
def test_cuda_step_does_not_synchronize(optimizer):
    ps = make_params([(4096, 64)] * 50 + [(100,)] * 5, torch.bfloat16, "cuda")
    opt = getattr(qlora_ext.optim, optimizer)(ps)
    for p, g in zip(ps, make_grads(ps, 0)):
        p.grad = g
    opt.step()  # the first step allocates the arena (allowed to synchronize)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build")
def test_cuda_managed_memory_is_freed_with_the_optimizer():
    gc.collect()
    before = _C.managed_live_bytes()
    ps = make_params([(1 << 20,), (4096, 64)], torch.bfloat16, "cuda")
    opt = PagedAdamW(ps)
    run_both(opt, torch.optim.SGD([torch.zeros(1, requires_grad=True)]), ps, [], steps=2)
    assert _C.managed_live_bytes() - before >= 8 * ((1 << 20) + 4096 * 64)
    sd = opt.state_dict()
    del opt
    gc.collect()
    assert _C.managed_live_bytes() > before  # the state dict's tensors still view the arena
    del sd
    gc.collect()
    torch.cuda.synchronize()
    assert _C.managed_live_bytes() == before


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build")
def test_cuda_load_state_dict_puts_states_in_the_arena():
    p_t = make_params(SHAPES[:3], torch.float32, "cuda")
    torch_opt = torch.optim.AdamW(p_t, fused=True)
    run_both(torch_opt, torch.optim.SGD([torch.zeros(1, requires_grad=True)]), p_t, [], steps=3)
    ours = PagedAdamW([p.detach().clone().requires_grad_() for p in p_t])
    ours.load_state_dict(copy.deepcopy(torch_opt.state_dict()))  # fused: steps on the GPU
    (arena,) = ours._arenas
    for a, b in zip(ours.param_groups[0]["params"], p_t):
        st = ours.state[a]
        assert st["step"].device.type == "cpu" and float(st["step"]) == 3
        assert arena.data_ptr() <= st["exp_avg"].data_ptr() < arena.data_ptr() + arena.numel()
        assert torch.equal(st["exp_avg"], torch_opt.state[b]["exp_avg"])


def test_load_state_dict_names_the_parameter_whose_moment_has_the_wrong_shape():
    params = [torch.zeros(4, 3, requires_grad=True), torch.zeros(5, requires_grad=True)]
    torch_opt = torch.optim.AdamW(params)
    for p in params:
        p.grad = torch.ones_like(p)
    torch_opt.step()
    sd = copy.deepcopy(torch_opt.state_dict())
    sd["state"][0]["exp_avg"] = torch.zeros(12)
    with pytest.raises(ValueError, match=r"the exp_avg of parameter 0 has shape \(12,\), but the parameter has "
                                         r"shape \(4, 3\)"):
        PagedAdamW([torch.zeros(4, 3, requires_grad=True), torch.zeros(5, requires_grad=True)]).load_state_dict(sd)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build")
@pytest.mark.parametrize("optimizer", ["PagedAdamW", "PagedAdamW8bit"])
def test_cuda_step_refuses_graph_capture(optimizer):
    p = torch.zeros(5000, device="cuda", requires_grad=True)
    p.grad = torch.ones_like(p)
    opt = getattr(qlora_ext, optimizer)([p])  # no step yet: the check comes before any state is made
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
            with torch.cuda.graph(graph, stream=stream):
                opt.step()


def test_package_exports():
    assert qlora_ext.PagedAdamW is PagedAdamW


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_and_pickles_step_as_the_original(device, how):
    """copy.deepcopy and pickle give an optimizer with its own storage (a new arena on CUDA) holding the same
    states: the copy and the original, given the same gradients, step to the same parameters."""
    import pickle
    params = make_params([(300, 70), (97,)], torch.bfloat16, device)
    opt = PagedAdamW(params, lr=1e-2, weight_decay=0.1, eps=1e-6)
    run_both(opt, opt, params, params, steps=2)   # (stepping one optimizer: states exist)
    pair = copy.deepcopy((opt, params)) if how == "deepcopy" else pickle.loads(pickle.dumps((opt, params)))
    other, other_params = pair
    assert all(q is p for q, p in zip(other.param_groups[0]["params"], other_params))
    assert other.paged == opt.paged and other.param_groups[0]["weight_decay"] == 0.1
    assert other.defaults == opt.defaults and other.defaults["eps"] == 1e-6   # (what a group added later takes)
    run_both(opt, other, params, other_params, steps=3, start=2)
    for a, b in zip(params, other_params):
        assert torch.equal(a, b) and a is not b
        assert torch.equal(opt.state[a]["exp_avg_sq"], other.state[b]["exp_avg_sq"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("how", ["load a state dict without it", "state.clear()", "del state[p]"])
def test_a_dropped_state_starts_again_from_zero_moments(device, how):
    """The moments' storage outlives a state: a state dropped (loading a state dict saved before the first step,
    clearing or deleting opt.state) starts again at zero moments and step 0, as a fresh torch.optim.AdamW."""
    params = make_params([(300, 70), (97,)], torch.float32, device)
    opt = PagedAdamW(params, lr=1e-2, weight_decay=0.1)
    before_any_step = opt.state_dict()
    run_both(opt, opt, params, params, steps=3)
    if how == "load a state dict without it":
        opt.load_state_dict(before_any_step)
    elif how == "state.clear()":
        opt.state.clear()
    else:
        for p in params:
            del opt.state[p]
    twins = [p.detach().clone().requires_grad_() for p in params]
    fresh = torch.optim.AdamW(twins, lr=1e-2, weight_decay=0.1)
    run_both(opt, fresh, params, twins, steps=2, start=3)
    for p, q in zip(params, twins):
        assert_close_fp32(p, q)
        assert_close_fp32(opt.state[p]["exp_avg"], fresh.state[q]["exp_avg"])
