"""qlora_ext.linear_cross_entropy (the chunked lm_head cross-entropy op) against a float64 reference,
chunking, ignore_index, gradcheck, opcheck, torch.compile, autocast, bad inputs, a trained head's gradients;
and the trainer's causal_lm_loss against transformers' own loss on a tiny Llama."""
import math

import pytest
import torch
import torch.nn.functional as F

import qlora_ext
from qlora_ext import linear_cross_entropy
from tests.conftest import DEVICES

ops = torch.ops.qlora_ext
IGNORE = -100


def make_inputs(rng, tokens, hidden, vocab, dtype, device, ignore_every=0, bias=False):
    h = torch.from_numpy(rng.standard_normal((tokens, hidden))).to(dtype).to(device)
    w = torch.from_numpy(rng.standard_normal((vocab, hidden)) / math.sqrt(hidden) * 3).to(dtype).to(device)
    b = torch.from_numpy(rng.standard_normal(vocab)).to(dtype).to(device) if bias else None
    labels = torch.from_numpy(rng.integers(0, vocab, tokens)).to(device)
    if ignore_every:
        labels[::ignore_every] = IGNORE
    return h, w, b, labels


def reference(h, w, b, labels):
    """Mean cross-entropy and its gradient in float64 on the upcast inputs (no chunking, torch's own ops)."""
    h64 = h.detach().double().requires_grad_()
    logits = F.linear(h64, w.double(), None if b is None else b.double())
    loss = F.cross_entropy(logits, labels, ignore_index=IGNORE)
    loss.backward()
    return loss.detach(), h64.grad


def usual_path(h, w, b, labels):
    """What a transformers model computes: logits in the input dtype, then the loss in float32."""
    hh = h.detach().clone().requires_grad_()
    loss = F.cross_entropy(F.linear(hh, w, b).float(), labels, ignore_index=IGNORE)
    loss.backward()
    return loss.detach(), hh.grad


def ours(h, w, b, labels, chunk_rows=0):
    hh = h.detach().clone().requires_grad_()
    loss = linear_cross_entropy(hh, w, labels, bias=b, chunk_rows=chunk_rows)
    loss.backward()
    return loss.detach(), hh.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tokens,vocab", [(1, 97), (63, 1), (65, 97), (97, 4097), (300, 65)])
@pytest.mark.parametrize("chunk_rows", [0, 1, 17])
def test_float32_matches_float64_reference(device, tokens, vocab, chunk_rows, rng):
    h, w, b, labels = make_inputs(rng, tokens, 64, vocab, torch.float32, device, ignore_every=5, bias=True)
    if (labels == IGNORE).all():  # tokens == 1: keep one label
        labels[0] = 0
    loss, grad = ours(h, w, b, labels, chunk_rows)
    want_loss, want_grad = reference(h, w, b, labels)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32 and grad.shape == h.shape
    torch.testing.assert_close(loss.double().cpu(), want_loss.cpu(), rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(grad.double().cpu(), want_grad.cpu(), rtol=1e-4, atol=1e-6)
    assert torch.all(grad[labels == IGNORE] == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_error_at_most_twice_the_usual_path(device, dtype, rng):
    h, w, b, labels = make_inputs(rng, 97, 128, 4097, dtype, device, ignore_every=7)
    want_loss, want_grad = reference(h, w, b, labels)
    usual_loss, usual_grad = usual_path(h, w, b, labels)
    loss, grad = ours(h, w, b, labels, chunk_rows=13)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    usual_err = (usual_grad.double().cpu() - want_grad.cpu()).abs().max()
    err = (grad.double().cpu() - want_grad.cpu()).abs().max()
    assert err <= 2 * usual_err + 1e-7, (err, usual_err)
    assert abs(float(loss) - float(want_loss)) <= 2 * abs(float(usual_loss) - float(want_loss)) + 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device, rng):
    h, w, b, labels = make_inputs(rng, 9, 8, 11, torch.float64, device, ignore_every=4, bias=True)
    h.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: linear_cross_entropy(x, w, labels, bias=b, chunk_rows=4), (h,))


@pytest.mark.parametrize("device", DEVICES)
def test_three_dim_hidden_and_chunking_give_the_same_result(device, rng):
    h, w, _, labels = make_inputs(rng, 2 * 33, 32, 50, torch.float32, device)
    flat = linear_cross_entropy(h, w, labels)
    batched = linear_cross_entropy(h.view(2, 33, 32), w, labels.view(2, 33), chunk_rows=5)
    torch.testing.assert_close(batched, flat, rtol=1e-6, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_every_label_ignored_gives_nan_loss_and_zero_gradient(device, rng):
    h, w, _, labels = make_inputs(rng, 5, 16, 7, torch.float32, device)
    labels[:] = IGNORE
    loss, grad = ours(h, w, None, labels)
    assert math.isnan(float(loss))
    assert torch.all(grad == 0)
    assert math.isnan(float(F.cross_entropy(F.linear(h, w), labels, ignore_index=IGNORE)))  # torch agrees


@pytest.mark.parametrize("device", DEVICES)
def test_no_grad_skips_the_gradient(device, rng):
    h, w, _, labels = make_inputs(rng, 8, 16, 7, torch.float32, device)
    loss, grad, grad_weight, grad_bias = ops.linear_cross_entropy(h, w, None, labels, IGNORE, False)
    assert grad.shape == (0, 16) and grad_weight.shape == (0, 16) and grad_bias.shape == (0,)
    torch.testing.assert_close(loss, F.cross_entropy(F.linear(h, w), labels), rtol=2e-6, atol=0)
    with torch.no_grad():
        assert torch.equal(linear_cross_entropy(h.requires_grad_(), w, labels), loss)


@pytest.mark.parametrize("device", DEVICES)
def test_incoming_gradient_scales_the_result(device, rng):
    h, w, _, labels = make_inputs(rng, 12, 16, 9, torch.float32, device)
    h1, h2 = h.clone().requires_grad_(), h.clone().requires_grad_()
    linear_cross_entropy(h1, w, labels).backward()
    (linear_cross_entropy(h2, w, labels) * 0.25).backward()
    torch.testing.assert_close(h2.grad, h1.grad * 0.25)


@pytest.mark.parametrize("device", DEVICES)
def test_incoming_gradient_scales_bf16_in_float32(device, rng):
    """Gradient accumulation divides the loss by, say, 3: the scale 1/3 must not be rounded to bf16 (0.3340,
    0.2% off) before it multiplies the gradient; the gradient is rounded once, from float32."""
    h, w, _, labels = make_inputs(rng, 12, 16, 9, torch.bfloat16, device)
    h1, h3 = h.clone().requires_grad_(), h.clone().requires_grad_()
    linear_cross_entropy(h1, w, labels).backward()
    (linear_cross_entropy(h3, w, labels) / 3).backward()
    assert torch.equal(h3.grad, (h1.grad.float() / 3).bfloat16())


def test_autocast_casts_like_nn_linear(rng):
    h, w, _, labels = make_inputs(rng, 33, 64, 97, torch.float32, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(h, w, labels)
    want = linear_cross_entropy(h.bfloat16(), w.bfloat16(), labels)
    assert torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device, rng):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        h, w, b, labels = make_inputs(rng, 33, 16, 29, dtype, device, ignore_every=3, bias=True)
        torch.library.opcheck(ops.linear_cross_entropy, (h, w, b, labels, IGNORE, False, 0, False))
        torch.library.opcheck(ops.linear_cross_entropy, (h.requires_grad_(), w, None, labels, IGNORE, True, 8,
                                                         False))


def test_torch_compile_fullgraph(rng):
    h, w, _, labels = make_inputs(rng, 24, 32, 40, torch.float32, "cpu")
    proj = torch.nn.Linear(32, 32)

    def step(x):
        return linear_cross_entropy(torch.tanh(proj(x)), w, labels)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x1, x2 = h.clone().requires_grad_(), h.clone().requires_grad_()
    step(x1).backward()
    compiled(x2).backward()
    torch.testing.assert_close(x2.grad, x1.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_give_clear_errors(device, rng):
    h, w, _, labels = make_inputs(rng, 6, 16, 7, torch.float32, device)
    bad = labels.clone()
    bad[2] = 7
    with pytest.raises(ValueError, match=r"labels must be in \[0, vocab = 7\)"):
        linear_cross_entropy(h, w, bad)
    bad[2] = -1
    with pytest.raises(ValueError, match="labels must be in"):
        linear_cross_entropy(h, w, bad)
    with pytest.raises(TypeError, match="weight must have hidden's dtype"):
        linear_cross_entropy(h, w.double(), labels)
    with pytest.raises(TypeError, match="labels must be int64"):
        linear_cross_entropy(h, w, labels.int())
    with pytest.raises(ValueError, match="labels must have hidden's leading shape"):
        linear_cross_entropy(h, w, labels[:5])
    with pytest.raises(ValueError, match=r"weight must be \[vocab, hidden_size\]"):
        linear_cross_entropy(h, w[:, :8], labels)
    with pytest.raises(TypeError, match="hidden must be float32"):
        linear_cross_entropy(h.int(), w, labels)
    with pytest.raises(ValueError, match="chunk_rows must be >= 0"):
        linear_cross_entropy(h, w, labels, chunk_rows=-1)


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and qlora_ext.build_info()["cuda"]), reason="needs a CUDA GPU")
def test_device_mismatch_is_an_error(rng):
    h, w, _, labels = make_inputs(rng, 6, 16, 7, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="weight must be on hidden's device"):
        linear_cross_entropy(h.cuda(), w, labels.cuda())
    with pytest.raises(RuntimeError, match="labels must be on hidden's device"):
        linear_cross_entropy(h.cuda(), w.cuda(), labels)


# ---- a trained head (modules_to_save=["lm_head"]): gradients for weight and bias too ---------------------

def head_reference(h, w, b, labels):
    """Loss and gradients of hidden, weight and bias in float64 on the upcast inputs (torch's own ops)."""
    leaves = [t.detach().double().requires_grad_() for t in (h, w, b)]
    loss = F.cross_entropy(F.linear(*leaves), labels, ignore_index=IGNORE)
    return (loss.detach(), *torch.autograd.grad(loss, leaves))


def head_ours(h, w, b, labels, chunk_rows=0):
    leaves = [t.detach().clone().requires_grad_() for t in (h, w, b)]
    loss = linear_cross_entropy(leaves[0], leaves[1], labels, bias=leaves[2], chunk_rows=chunk_rows)
    return (loss.detach(), *torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tokens,vocab", [(1, 97), (65, 97), (97, 4097), (300, 65)])
@pytest.mark.parametrize("chunk_rows", [0, 1, 17])
def test_head_gradients_match_float64_reference(device, tokens, vocab, chunk_rows, rng):
    h, w, b, labels = make_inputs(rng, tokens, 64, vocab, torch.float32, device, ignore_every=5, bias=True)
    if (labels == IGNORE).all():
        labels[0] = 0
    got = head_ours(h, w, b, labels, chunk_rows)
    want = head_reference(h, w, b, labels)
    for g, t in zip(got[1:], (h, w, b)):
        assert g.dtype == t.dtype and g.shape == t.shape
    torch.testing.assert_close(got[0].double().cpu(), want[0].cpu(), rtol=2e-6, atol=1e-6)
    for g, ref in zip(got[1:], want[1:]):
        torch.testing.assert_close(g.double().cpu(), ref.cpu(), rtol=1e-4, atol=1e-6)
    ignored = labels == IGNORE
    if ignored.any():   # ignored rows contribute nothing: dropping them changes no head gradient
        kept = head_ours(h[~ignored], w, b, labels[~ignored], chunk_rows)
        torch.testing.assert_close(kept[2], got[2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_head_gradients_at_most_twice_the_usual_path_error(device, dtype, rng):
    h, w, b, labels = make_inputs(rng, 97, 128, 4097, dtype, device, ignore_every=7, bias=True)
    want = head_reference(h, w, b, labels)
    leaves = [t.detach().clone().requires_grad_() for t in (h, w, b)]
    usual = torch.autograd.grad(F.cross_entropy(F.linear(*leaves).float(), labels, ignore_index=IGNORE), leaves)
    got = head_ours(h, w, b, labels, chunk_rows=13)
    for g, u, ref in zip(got[1:], usual, want[1:]):
        assert g.dtype == dtype
        err = (g.double().cpu() - ref.cpu()).abs().max()
        usual_err = (u.double().cpu() - ref.cpu()).abs().max()
        assert err <= 2 * usual_err + 1e-7, (err, usual_err)


@pytest.mark.parametrize("device", DEVICES)
def test_float16_with_a_gradient_scaler_loses_no_small_gradients(device, rng):
    """GradScaler's recipe, (loss * S).backward(): the usual path's GEMMs see (softmax - onehot) * S / count, where
    (softmax - onehot) / count alone is below float16's range for a large vocabulary and batch (here ~3e-8). The
    op keeps the float16 gradients in float32 until the backward's scale: errors as the usual path's."""
    h, w, _, labels = make_inputs(rng, 2048, 64, 16000, torch.float16, device)
    w = w * 0.05
    scale = 65536.0
    ref = [t.detach().double().requires_grad_() for t in (h, w)]
    F.cross_entropy(F.linear(*ref), labels).backward()

    def scaled_grads(loss_of):
        leaves = [t.detach().clone().requires_grad_() for t in (h, w)]
        (loss_of(*leaves) * scale).backward()
        return [t.grad.double().cpu() / scale for t in leaves]

    usual = scaled_grads(lambda a, b: F.cross_entropy(F.linear(a, b).float(), labels))
    ours = scaled_grads(lambda a, b: linear_cross_entropy(a, b, labels))
    for u, o, r in zip(usual, ours, (ref[0].grad.cpu(), ref[1].grad.cpu())):
        assert float((o - r).norm() / r.norm()) <= 2 * float((u - r).norm() / r.norm()) + 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_head_gradcheck_float64(device, rng):
    h, w, b, labels = make_inputs(rng, 9, 8, 11, torch.float64, device, ignore_every=4, bias=True)
    inputs = tuple(t.requires_grad_() for t in (h, w, b))
    assert torch.autograd.gradcheck(lambda x, y, z: linear_cross_entropy(x, y, labels, bias=z, chunk_rows=4),
                                    inputs)


@pytest.mark.parametrize("device", DEVICES)
def test_head_alone_trains_with_frozen_hidden(device, rng):
    # a head trained on frozen features: hidden needs no gradient, the weight and bias do
    h, w, b, labels = make_inputs(rng, 20, 16, 13, torch.float32, device, bias=True)
    wt, bt = w.clone().requires_grad_(), b.clone().requires_grad_()
    linear_cross_entropy(h, wt, labels, bias=bt, chunk_rows=6).backward()
    _, _, want_w, want_b = head_reference(h, w, b, labels)
    torch.testing.assert_close(wt.grad.double().cpu(), want_w.cpu(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(bt.grad.double().cpu(), want_b.cpu(), rtol=1e-4, atol=1e-6)
    wf = w.clone().requires_grad_()   # weight trained, bias frozen
    linear_cross_entropy(h, wf, labels, bias=b).backward()
    torch.testing.assert_close(wf.grad.double().cpu(), want_w.cpu(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_incoming_gradient_scales_bf16_head_gradient_in_float32(device, rng):
    h, w, _, labels = make_inputs(rng, 12, 16, 9, torch.bfloat16, device)
    w1, w3 = w.clone().requires_grad_(), w.clone().requires_grad_()
    loss1 = linear_cross_entropy(h, w1, labels)
    loss1.backward()
    (linear_cross_entropy(h, w3, labels) / 3).backward()
    _, _, raw, _ = ops.linear_cross_entropy(h, w, None, labels, IGNORE, False, 0, True)
    assert raw.dtype == torch.float32
    assert torch.equal(w1.grad, raw.bfloat16())
    assert torch.equal(w3.grad, (raw / 3).bfloat16())


def test_autocast_trains_a_float32_head_through_its_bf16_copy(rng):
    h, w, b, labels = make_inputs(rng, 33, 64, 97, torch.float32, "cpu", bias=True)
    wt, bt = w.clone().requires_grad_(), b.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        linear_cross_entropy(h, wt, labels, bias=bt).backward()
    _, _, want_w, want_b = ops.linear_cross_entropy(h.bfloat16(), w.bfloat16(), b.bfloat16(), labels, IGNORE,
                                                    False, 0, True)
    assert wt.grad.dtype == torch.float32 and bt.grad.dtype == torch.float32
    # the float32 sum passes through the bf16 copy's gradient (the cast's backward) on its way to the weight
    assert torch.equal(wt.grad, want_w.bfloat16().float())
    assert torch.equal(bt.grad, want_b.bfloat16().float())


@pytest.mark.parametrize("device", DEVICES)
def test_head_opcheck(device, rng):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        h, w, b, labels = make_inputs(rng, 33, 16, 29, dtype, device, ignore_every=3, bias=True)
        torch.library.opcheck(ops.linear_cross_entropy,
                              (h.requires_grad_(), w.requires_grad_(), b.requires_grad_(), labels, IGNORE, True, 8,
                               True))
        torch.library.opcheck(ops.linear_cross_entropy, (h.detach(), w.detach(), None, labels, IGNORE, False, 0, True))


def test_head_torch_compile_fullgraph(rng):
    h, w, b, labels = make_inputs(rng, 24, 32, 40, torch.float32, "cpu", bias=True)
    proj = torch.nn.Linear(32, 32)

    def step(x, weight, bias):
        return linear_cross_entropy(torch.tanh(proj(x)), weight, labels, bias=bias)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager_leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    compiled_leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    step(*eager_leaves).backward()
    compiled(*compiled_leaves).backward()
    for e, c in zip(eager_leaves, compiled_leaves):
        torch.testing.assert_close(c.grad, e.grad)


# ---- the trainer's loss on a real transformers model ----------------------------------------------------

def assert_loss_matches_transformers(model, params, ids, labels=None):
    """The trainer's causal_lm_loss and its gradients for params are transformers' own loss and gradients."""
    from qlora_ext.train.loss import causal_lm_loss
    labels = ids if labels is None else labels
    want = model(input_ids=ids, labels=labels, use_cache=False).loss
    want_grads = torch.autograd.grad(want, params)
    got = causal_lm_loss(model, ids, labels)
    got_grads = torch.autograd.grad(got, params)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)


def tiny_llama(tie=True):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=301, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).float()


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_causal_lm_loss_matches_transformers(tie, checkpointing):
    pytest.importorskip("transformers")
    from qlora_ext.train.loss import fused_head
    model = tiny_llama(tie)
    qlora_ext.prepare_model(model, r=4, alpha=8, dropout=0.0)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    assert fused_head(model) is not None
    ids = torch.randint(0, 301, (3, 17), generator=torch.Generator().manual_seed(1))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # lora_B starts at zero: give it values so that every gradient is non-trivial
        if p.abs().max() == 0:
            torch.nn.init.normal_(p, std=0.02)
    assert_loss_matches_transformers(model, params, ids)


@pytest.mark.parametrize("fused", [True, False])
def test_causal_lm_loss_with_ignored_labels_matches_transformers(fused):
    # instruction data: labels -100 where a token is context only; both paths give transformers' loss
    pytest.importorskip("transformers")
    from qlora_ext.train.loss import causal_lm_loss, fused_head
    model = tiny_llama(tie=False)
    targets = None if fused else ["q_proj", "lm_head"]
    qlora_ext.prepare_model(model, target_modules=targets, r=4, alpha=8, quant_type="none")
    assert (fused_head(model) is not None) == fused
    ids = torch.randint(0, 301, (3, 17), generator=torch.Generator().manual_seed(3))
    labels = ids.masked_fill(torch.rand(ids.shape, generator=torch.Generator().manual_seed(4)) < 0.6, -100)
    labels[:, 1] = ids[:, 1]   # at least one label per row
    torch.testing.assert_close(causal_lm_loss(model, ids, labels),
                               model(input_ids=ids, labels=labels, use_cache=False).loss, rtol=1e-6, atol=0)


def test_causal_lm_loss_falls_back_when_the_head_is_adapted_or_unknown():
    pytest.importorskip("transformers")
    from qlora_ext.train.loss import causal_lm_loss, fused_head
    model = tiny_llama(tie=False)
    qlora_ext.prepare_model(model, target_modules=["q_proj", "lm_head"], r=4, alpha=8, quant_type="none")
    assert fused_head(model) is None  # lm_head is a LoRALinear now: its adapter needs the logits' gradient
    ids = torch.randint(0, 301, (2, 9), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(causal_lm_loss(model, ids), model(input_ids=ids, labels=ids).loss)

    class Wrapper(torch.nn.Module):  # not a transformers class with a plain head
        def __init__(self, inner):
            super().__init__()
            self.inner, self.model, self.lm_head = inner, inner.model, torch.nn.Linear(64, 301)

        def forward(self, **kw):
            return self.inner(**kw)

    assert fused_head(Wrapper(tiny_llama())) is None


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and qlora_ext.build_info()["cuda"]), reason="needs a CUDA GPU")
def test_cuda_graph_capture_and_replay(rng):
    """Captured in a CUDA graph (as torch.compile's "reduce-overhead" does), the op skips its host-side label
    check and replays with new inputs written into the captured buffers."""
    h, w, _, labels = make_inputs(rng, 33, 64, 97, torch.bfloat16, "cuda")
    linear_cross_entropy(h, w, labels)  # warm-up outside the capture (cuBLAS handles, allocator)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        linear_cross_entropy(h, w, labels)
        with torch.cuda.graph(graph, stream=stream):
            loss = linear_cross_entropy(h, w, labels)
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()  # the capture recorded the kernels without running them
    torch.cuda.synchronize()
    first = loss.clone()
    torch.testing.assert_close(first, linear_cross_entropy(h, w, labels), rtol=1e-3, atol=0)
    h2, _, _, labels2 = make_inputs(rng, 33, 64, 97, torch.bfloat16, "cuda")
    h.copy_(h2)
    labels.copy_(labels2)
    graph.replay()
    torch.cuda.synchronize()
    want = linear_cross_entropy(h2, w, labels2)
    # the captured GEMM may be another cuBLAS algorithm than the eager one: not bit for bit
    torch.testing.assert_close(loss, want, rtol=1e-3, atol=0)
    assert (first - want).abs() > 1e-2 * want.abs()  # the replay read the new inputs


@pytest.mark.parametrize("tie", [True, False])
def test_causal_lm_loss_with_a_trained_head_matches_transformers(tie, monkeypatch):
    # modules_to_save=["lm_head"]: the head trains whole and the loss still skips the logits (for at least
    # hidden_size tokens: below that the logits path needs less memory)
    pytest.importorskip("transformers")
    import warnings
    from qlora_ext.train import loss as loss_module
    from qlora_ext.train.loss import causal_lm_loss, fused_head
    calls = []
    monkeypatch.setattr(loss_module, "linear_cross_entropy", lambda *a, **k: calls.append(1) or
                        linear_cross_entropy(*a, **k))
    model = tiny_llama(tie)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # (tied: the trained copy is untied from the embeddings)
        qlora_ext.prepare_model(model, r=4, alpha=8, dropout=0.0, modules_to_save=["lm_head"])
    model.train()
    assert fused_head(model)[1] is model.lm_head.trained_module
    params = [p for p in model.parameters() if p.requires_grad]
    assert any(p is model.lm_head.trained_module.weight for p in params)
    for p in params:
        if p.abs().max() == 0:
            torch.nn.init.normal_(p, std=0.02)
    ids = torch.randint(0, 301, (3, 23), generator=torch.Generator().manual_seed(5))   # 66 tokens >= 64
    labels = ids.masked_fill(torch.rand(ids.shape, generator=torch.Generator().manual_seed(6)) < 0.3, -100)
    assert_loss_matches_transformers(model, params, ids, labels)
    assert calls == [1]
    assert fused_head(model, tokens=63) is None and fused_head(model, tokens=64) is not None
    causal_lm_loss(model, ids[:, :20], labels[:, :20])   # 57 tokens: the logits path
    assert calls == [1]
    with qlora_ext.adapters_disabled(model):   # the frozen original runs, still without the logits
        assert fused_head(model)[1] is model.lm_head.original_module
        with torch.no_grad():
            torch.testing.assert_close(causal_lm_loss(model, ids, labels),
                                       model(input_ids=ids, labels=labels, use_cache=False).loss, rtol=1e-6, atol=0)
