"""Rows of the token embedding trained on their own (prepare_model(trainable_token_indices=...),
qlora_ext/trainable_tokens.py), checked against a plain model with those rows set by hand and against PEFT's
trainable_token_indices both ways: only the chosen rows train (and a tied LM head reads them), adapters_disabled
gives the base, merging writes the rows in, save_4bit writes the base, and misuse is refused by name."""
import copy
import json
import pickle
import re
import warnings

import pytest
import torch

import qlora_ext
from qlora_ext.peft_io import load_peft_adapter, save_peft_adapter
from qlora_ext.trainable_tokens import TiedTokensHead, TrainableTokens
from tests import test_modules_to_save as modules_to_save_tests
from tests.test_modules_to_save import tiny_llama

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

TOKENS = [3, 95, 40]
IDS = torch.tensor([[3, 5, 95, 40, 7, 3, 11, 2, 40], [1, 95, 95, 6, 3, 8, 9, 10, 12]])


def logits(model, ids=IDS):
    return modules_to_save_tests.logits(model, ids)


def prepared(tied, tokens=TOKENS, quant_type="none", **kw):
    return qlora_ext.prepare_model(tiny_llama(tied), r=4, alpha=8.0, quant_type=quant_type,
                                   trainable_token_indices=tokens, **kw).eval()


def set_rows(model, seed=1, adapters=True):
    """New values for the trained rows (as if trained), and small random adapters unless not `adapters`;
    returns the rows."""
    g = torch.Generator().manual_seed(seed)
    delta = model.model.embed_tokens.trainable_tokens_delta
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and (adapters or p is delta):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return delta.detach().clone()


def by_hand(tied, rows, tokens=TOKENS):
    """The plain dense model with the rows written into its embedding (and so its tied head)."""
    model = tiny_llama(tied)
    with torch.no_grad():
        model.model.embed_tokens.weight[torch.tensor(tokens)] = rows
    return model


def peft_trained(tied, trainable_token_indices):
    """PEFT's own LoRA model with trainable tokens, its trainable tensors changed a little (as if trained)."""
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM",
                          trainable_token_indices=trainable_token_indices)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_llama(tied), cfg)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return theirs


@pytest.mark.parametrize("tied", [False, True])
def test_only_the_chosen_rows_train_and_a_tied_head_reads_them(tied):
    base = tiny_llama(tied)
    model = prepared(tied)
    assert isinstance(model.model.embed_tokens, TrainableTokens)
    assert isinstance(model.lm_head, TiedTokensHead) == tied
    torch.testing.assert_close(logits(model), logits(base), rtol=0, atol=0)   # it starts as the base
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert "model.embed_tokens.trainable_tokens_delta" in trainable
    assert not any("embed_tokens.base_layer" in n or "lm_head" in n for n in trainable)
    assert model.model.embed_tokens.trainable_tokens_delta.dtype == torch.float32
    # the gradient of the rows is that of the same rows of a plain model's embedding (with the tied head's part)
    plain = tiny_llama(tied).train()
    model.train()
    want = plain(input_ids=IDS, labels=IDS).loss
    want.backward()
    got = model(input_ids=IDS, labels=IDS).loss
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    torch.testing.assert_close(model.model.embed_tokens.trainable_tokens_delta.grad,
                               plain.model.embed_tokens.weight.grad[torch.tensor(TOKENS)], rtol=1e-5, atol=1e-7)
    # trained: the model computes the plain model with those rows (its adapters still zero)
    rows = set_rows(model, adapters=False)
    torch.testing.assert_close(logits(model.eval()), logits(by_hand(tied, rows)), rtol=1e-5, atol=1e-5)
    assert torch.equal(model.model.embed_tokens.base_layer.weight, base.model.embed_tokens.weight)  # untouched
    with qlora_ext.adapters_disabled(model):
        torch.testing.assert_close(logits(model), logits(base), rtol=0, atol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_the_trainer_loss_path_matches_transformers_with_trainable_tokens(tied):
    from qlora_ext.train.loss import fused_head
    from tests.test_cross_entropy import assert_loss_matches_transformers
    model = prepared(tied).train()
    set_rows(model)
    ids = torch.cat([IDS] * 5, dim=1)   # 88 predicted tokens: a trained (tied) head takes the chunked loss
    assert fused_head(model, tokens=88) is not None   # also with the tied head's merged weight
    assert_loss_matches_transformers(model, [p for p in model.parameters() if p.requires_grad], ids)


@pytest.mark.parametrize("tied", [False, True])
def test_merged_model_holds_the_trained_rows(tied):
    model = prepared(tied)
    rows = set_rows(model)
    want = logits(model)
    merged = qlora_ext.merge_and_unload(model)
    assert type(merged.model.embed_tokens) is torch.nn.Embedding and type(merged.lm_head) is torch.nn.Linear
    assert (merged.lm_head.weight is merged.model.embed_tokens.weight) == tied
    assert torch.equal(merged.model.embed_tokens.weight[torch.tensor(TOKENS)], rows)
    torch.testing.assert_close(logits(merged), want, rtol=1e-5, atol=1e-5)   # (W + s B A merged: rounding)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("quant_type", ["none", "nf4"])
def test_peft_loads_what_we_save_and_we_load_what_peft_saves(tmp_path, tied, quant_type):
    ours = prepared(tied, quant_type=quant_type)
    set_rows(ours)
    save_peft_adapter(ours, str(tmp_path / "ours"))
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == TOKENS
    again = prepared(tied, quant_type=quant_type)
    load_peft_adapter(again, str(tmp_path / "ours"))
    torch.testing.assert_close(logits(again), logits(ours), rtol=0, atol=0)
    if quant_type != "none":
        return
    with warnings.catch_warnings():   # PEFT computes ours from the same dense base
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tiny_llama(tied), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(logits(theirs), logits(ours), rtol=1e-5, atol=1e-5)

    theirs = peft_trained(tied, TOKENS)
    theirs.save_pretrained(str(tmp_path / "peft"))
    mine = prepared(tied)
    load_peft_adapter(mine, str(tmp_path / "peft"))
    torch.testing.assert_close(logits(mine), logits(theirs.eval()), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=re.escape("trainable_token_indices=[3, 95, 40] (rows {'model.embed_tokens': "
                                                   "[3, 95, 40]}), but the model trains the rows of none")):
        load_peft_adapter(qlora_ext.prepare_model(tiny_llama(tied), r=4, alpha=8.0, quant_type="none"),
                          str(tmp_path / "peft"))
    with pytest.raises(ValueError, match=re.escape("but the model trains the rows {'model.embed_tokens': [3, 40]}")):
        load_peft_adapter(prepared(tied, [3, 40]), str(tmp_path / "peft"))


def test_a_peft_folder_naming_the_tied_head_too_loads(tmp_path):
    """PEFT's dict form may name both tied modules ({"embed_tokens": ids, "lm_head": ids}); the head reads the
    embedding's rows, so the folder holds the embedding's alone."""
    theirs = peft_trained(True, {"embed_tokens": TOKENS, "lm_head": TOKENS})
    theirs.save_pretrained(str(tmp_path / "peft"))
    mine = prepared(True)
    load_peft_adapter(mine, str(tmp_path / "peft"))
    torch.testing.assert_close(logits(mine), logits(theirs.eval()), rtol=1e-5, atol=1e-5)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    config["trainable_token_indices"]["lm_head"] = [3, 40]
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=re.escape("gives the tied lm_head the rows [3, 40], its embedding [3, 95, 40]")):
        load_peft_adapter(prepared(True), str(tmp_path / "peft"))


def test_an_embedding_named_in_a_dict_and_written_with_its_path(tmp_path):
    model = prepared(False, {"embed_tokens": [5, 6]})
    assert model.model.embed_tokens.indices() == [5, 6]
    set_rows(model)
    model.get_input_embeddings = lambda: None   # not the input embedding any more: written as {path: ids}
    save_peft_adapter(model, str(tmp_path / "a"))
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["trainable_token_indices"] == {
        "model.embed_tokens": [5, 6]}
    again = prepared(False, {"model.embed_tokens": [5, 6]})
    load_peft_adapter(again, str(tmp_path / "a"))
    torch.testing.assert_close(logits(again), logits(model), rtol=0, atol=0)


def test_misuse_is_refused_before_anything_changes():
    model = tiny_llama(True)
    for spec, message in (([96], "[96] are not token ids of an embedding of 96 rows"),
                          ([3, 3], "token ids [3] are given more than once"),
                          ([], "is empty"),
                          ("3", "must be a list of token ids"),
                          ([1.5], "[1.5] are not token ids"),
                          ({"embed_tokenz": [1]}, "'embed_tokenz' selects no embedding"),
                          ({"lm_head": [1]}, "'lm_head' selects no embedding")):
        with pytest.raises(ValueError, match=re.escape(message)):
            qlora_ext.prepare_model(model, quant_type="none", trainable_token_indices=spec)
    with pytest.raises(ValueError, match="model.embed_tokens is trained whole \\(modules_to_save\\) and cannot also"):
        qlora_ext.prepare_model(model, quant_type="none", trainable_token_indices=[1],
                                modules_to_save=["embed_tokens"])
    assert not any(isinstance(m, (TrainableTokens, qlora_ext.LoRALinear)) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    qlora_ext.prepare_model(model, quant_type="none", trainable_token_indices=[1, 2])
    qlora_ext.prepare_model(model, quant_type="none", trainable_token_indices=[1, 2])   # again: as it is
    assert model.model.embed_tokens.trainable_tokens_delta.requires_grad
    with pytest.raises(ValueError, match=re.escape("model.embed_tokens already trains tokens [1, 2], not [1]")):
        qlora_ext.prepare_model(model, quant_type="none", trainable_token_indices=[1])
    # a second call may not train the embedding whole too
    with pytest.raises(ValueError, match="model.embed_tokens holds LoRA adapters, quantized weights, trainable tokens"):
        qlora_ext.prepare_model(model, quant_type="none", modules_to_save=["embed_tokens"])


def test_a_lora_adapted_head_tied_to_trained_tokens_is_refused():
    """Its adapter's base would compute with the rows as they were (and merging would write in the trained ones):
    refused in one call and in either order over two."""
    with pytest.raises(ValueError, match="lm_head is tied to an embedding with trainable tokens"):
        qlora_ext.prepare_model(tiny_llama(True), quant_type="none", target_modules=["q_proj", "lm_head"], exclude=(),
                                trainable_token_indices=[1])
    adapted = qlora_ext.prepare_model(tiny_llama(True), quant_type="none", target_modules=["lm_head"], exclude=())
    with pytest.raises(ValueError, match="model.embed_tokens's weight is also lm_head.base's \\(tied\\)"):
        qlora_ext.prepare_model(adapted, quant_type="none", trainable_token_indices=[1])
    tokens = prepared(True)
    with pytest.raises(ValueError, match="target_modules \\['lm_head'\\] match no nn.Linear"):
        qlora_ext.prepare_model(tokens, quant_type="none", target_modules=["lm_head"], exclude=())
    untied = qlora_ext.prepare_model(tiny_llama(False), quant_type="none", target_modules=["q_proj", "lm_head"],
                                     exclude=(), trainable_token_indices=[1])   # untied: no clash
    assert isinstance(untied.lm_head, qlora_ext.LoRALinear)


def test_a_head_trained_whole_and_tied_to_trained_tokens_is_warned_of():
    """PEFT 0.21 builds a tied model with lm_head in modules_to_save and trainable tokens, and cannot run it (its
    tied-tokens layer refuses the wrapped head): warned; not where the head is untied, or without tokens."""
    import warnings
    with pytest.warns(UserWarning, match="lm_head is trained whole .* PEFT \\(0.21\\) cannot run this setup"):
        qlora_ext.prepare_model(tiny_llama(True), quant_type="none", modules_to_save=["lm_head"],
                                trainable_token_indices=[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qlora_ext.prepare_model(tiny_llama(False), quant_type="none", modules_to_save=["lm_head"],
                                trainable_token_indices=[1])
        qlora_ext.prepare_model(tiny_llama(True), quant_type="none", trainable_token_indices=[1])


def test_save_4bit_writes_the_base_and_a_prepared_model_copies_and_pickles(tmp_path):
    model = prepared(True, quant_type="nf4")
    set_rows(model)
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        torch.testing.assert_close(logits(other), logits(model), rtol=0, atol=0)
        assert other.lm_head.tokens is other.model.embed_tokens
    modules_to_save_tests.assert_save_4bit_writes_the_base(model, str(tmp_path / "q4"), IDS)


def test_torch_compile_fullgraph():
    model = prepared(True).train()
    set_rows(model)
    params = [p for p in model.parameters() if p.requires_grad]
    want = torch.autograd.grad(model(input_ids=IDS, labels=IDS).loss, params)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(input_ids=IDS, labels=IDS).loss, params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and qlora_ext.build_info()["cuda"]), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tied", [False, True])
def test_cuda_bf16_rows_train_through_the_chunked_loss(tied):
    """On a GPU in bf16 (the trainer's setting): the float32 rows get the gradient of the plain path, within bf16
    rounding, through the chunked loss (a tied head's merged weight included)."""
    from qlora_ext.train.loss import causal_lm_loss
    model = qlora_ext.prepare_model(tiny_llama(tied).to("cuda", torch.bfloat16), r=4, alpha=8.0, quant_type="nf4",
                                    compute_dtype=torch.bfloat16, trainable_token_indices=TOKENS).train()
    delta = model.model.embed_tokens.trainable_tokens_delta
    assert delta.dtype == torch.float32 and delta.is_cuda
    ids = torch.cat([IDS] * 5, dim=1).cuda()
    want = model(input_ids=ids, labels=ids, use_cache=False).loss
    (want_grad,) = torch.autograd.grad(want, [delta])
    got = causal_lm_loss(model, ids)
    (got_grad,) = torch.autograd.grad(got, [delta])
    assert got.dtype == torch.float32 and torch.isfinite(got_grad).all()
    torch.testing.assert_close(got, want.float(), rtol=2e-2, atol=2e-2)
    assert float((got_grad - want_grad).norm() / want_grad.norm()) < 3e-2
