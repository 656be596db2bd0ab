"""transformers' Trainer on a prepared model, as README says: PagedAdamW / PagedAdamW8bit through `optimizers=`,
gradient checkpointing, and resume_from_checkpoint giving the adapters of an uninterrupted run, bit for bit
(the optimizer's state and step counts come back from the Trainer's checkpoint)."""
import pytest
import torch

import qlora_ext

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")   # (the Trainer needs it)


class Blocks(torch.utils.data.Dataset):
    def __init__(self, vocab: int):
        # counting sequences from a few starts: learnable in a few steps
        starts = torch.randint(0, 4, (32, 1), generator=torch.Generator().manual_seed(0))
        self.ids = (starts * 7 + torch.arange(16)) % vocab

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _trainer(out, optimizer_class, steps: int):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = qlora_ext.prepare_model(transformers.LlamaForCausalLM(cfg), r=4, alpha=8, dropout=0.1)
    optimizer = optimizer_class([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    args = transformers.TrainingArguments(str(out), per_device_train_batch_size=4, max_steps=steps, save_steps=3,
                                          gradient_checkpointing=True, report_to=[], use_cpu=True, seed=0,
                                          disable_tqdm=True, logging_steps=1, lr_scheduler_type="cosine",
                                          warmup_steps=1)
    return model, transformers.Trainer(model=model, args=args, train_dataset=Blocks(cfg.vocab_size),
                                       optimizers=(optimizer, None))


@pytest.mark.parametrize("optimizer_class", [qlora_ext.PagedAdamW, qlora_ext.PagedAdamW8bit])
def test_trainer_trains_and_resumes_bit_exactly(tmp_path, optimizer_class):
    straight, trainer = _trainer(tmp_path / "run", optimizer_class, steps=6)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 6 and losses[-1] < losses[0]
    expected = {n: p.detach().clone() for n, p in straight.named_parameters() if p.requires_grad}
    resumed, trainer = _trainer(tmp_path / "run", optimizer_class, steps=6)
    trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    got = {n: p.detach() for n, p in resumed.named_parameters() if p.requires_grad}
    assert got.keys() == expected.keys() and all(torch.equal(got[n], expected[n]) for n in got)
    # the adapters leave as a PEFT folder (the Trainer's own save holds the whole 4-bit model)
    qlora_ext.save_peft_adapter(resumed, str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
