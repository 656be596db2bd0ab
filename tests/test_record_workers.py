"""Record files tokenized by several processes (record_workers.RecordTokenizer, --num-proc): the same examples in
the same order as one process, and the same first error (a record that cannot be rendered, tokenized or read),
with the workers really started (the batch sizes are made small so a test file is "large")."""
import json
import os
import signal

import pytest

from qlora_ext.train import record_workers
from qlora_ext.train.config import ConfigError, TrainConfig
from qlora_ext.train.data import tokenize_data
from qlora_ext.train.record_workers import RecordTokenizer, tokenize_record_file
from tests.test_instructions import tokenizer  # noqa: F401  (a byte-level BPE tokenizer with ChatML, a fixture)

pytest.importorskip("transformers")


@pytest.fixture
def small_batches(monkeypatch):
    """Batches of 3 records, workers from the 7th record on: a file of a hundred records uses them."""
    monkeypatch.setattr(record_workers, "TOKENIZE_BATCH", 3)
    monkeypatch.setattr(record_workers, "START_AFTER", 7)


def _records(n: int) -> list:
    """n records of every format, of varied lengths."""
    out = []
    for i in range(n):
        words = " ".join(["the king", "and queen", "walk in the garden", "while the ghost speaks"][: 1 + i % 4])
        kind = i % 4
        if kind == 0:
            out.append({"text": f"{words} {i}"})
        elif kind == 1:
            out.append({"prompt": f"{i}: {words}", "completion": " the ghost" * (1 + i % 3)})
        elif kind == 2:
            out.append({"messages": [{"role": "user", "content": words}, {"role": "assistant", "content": str(i)},
                                     {"role": "user", "content": "again"}, {"role": "assistant", "content": words}]})
        else:
            out.append({"prompt": [{"role": "user", "content": words}],
                        "completion": [{"role": "assistant", "content": f"{i} {words}"}]})
    return out


def _write(path, records, bad_lines=None) -> str:
    """A .jsonl file of the records; bad_lines: {line number (1-based): raw text put in its place}."""
    lines = [json.dumps(r) for r in records]
    for number, raw in (bad_lines or {}).items():
        lines[number - 1] = raw
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("prefix", [None, [], [0]])
def test_workers_give_the_examples_of_one_process(tokenizer, tmp_path, small_batches, prefix):
    path = _write(tmp_path / "r.jsonl", _records(101))
    one = tokenize_record_file(path, tokenizer, prefix)
    with RecordTokenizer(tokenizer, prefix, num_proc=2) as many:
        assert many.file(path) == one
        assert many.workers == 2   # (the workers did the work: not the one-process path again)
        assert many.file(path) == one   # a second file reuses them
    assert many.executor is None   # leaving the context stops them
    assert len(one) == 101 and all(len(ids) == len(trained) > 0 for ids, trained in one)


def test_a_small_file_is_tokenized_without_workers(tokenizer, tmp_path, small_batches):
    path = _write(tmp_path / "r.jsonl", _records(6))
    with RecordTokenizer(tokenizer, [], num_proc=2) as many:
        assert many.file(path) == tokenize_record_file(path, tokenizer, [])
        assert many.workers == 0


@pytest.mark.parametrize("bad, error", [
    ({40: json.dumps({"prompt": "no completion"})}, ":40: a record must hold exactly one of"),
    ({40: json.dumps({"messages": [{"role": "user", "content": "no answer"}]})}, ":40: a conversation without"),
    ({40: '{"text": "a lone \\ud800 surrogate"}'}, ":40: "),   # the tokenizer refuses it
    ({70: "not json"}, ":70: not valid JSON"),
    ({40: json.dumps({"prompt": "no completion"}), 70: "not json"}, ":40: a record must hold"),   # the first
    ({41: '{"text": "a lone \\ud800 surrogate"}', 42: json.dumps({"prompt": "x"})}, ":41: "),  # one batch
    ({41: json.dumps({"prompt": "x"}), 42: "not json"}, ":41: a record must hold"),   # read error after, one batch
    ({60: json.dumps({"prompt": "x"}), 64: "not json"}, ":60: a record must hold"),   # ... in a batch still out
])
def test_workers_report_the_first_bad_record(tokenizer, tmp_path, small_batches, bad, error):
    path = _write(tmp_path / "r.jsonl", _records(101), bad)
    with pytest.raises(ConfigError, match=error) as one:
        tokenize_record_file(path, tokenizer, [])
    with RecordTokenizer(tokenizer, [], num_proc=2) as many:
        with pytest.raises(ConfigError, match=error) as parallel:
            many.file(path)
        assert many.workers == 2
    assert str(parallel.value) == str(one.value)
    assert f"{path}:{min(bad)}: " in str(one.value)


def _dying_work(batch):
    """record_workers._work, but the worker process is killed (as by the OOM killer) on the batch of line 50."""
    if any(where.endswith(":50") for where, _ in batch):
        os.kill(os.getpid(), signal.SIGKILL)
    return record_workers.tokenize_batch(record_workers._tokenizer, batch, record_workers._prefix)


def test_a_worker_that_dies_is_an_error_not_a_hang(tokenizer, tmp_path, small_batches, monkeypatch):
    monkeypatch.setattr(record_workers, "_work", _dying_work)
    path = _write(tmp_path / "r.jsonl", _records(101))
    with RecordTokenizer(tokenizer, [], num_proc=2) as many:
        with pytest.raises(ConfigError, match="a process tokenizing it stopped .* --num-proc 1 starts fewer"):
            many.file(path)


def test_tokenize_data_is_the_same_for_any_num_proc(tokenizer, tmp_path, small_batches):
    files = [_write(tmp_path / "a.jsonl", _records(50)), _write(tmp_path / "b.jsonl", _records(31)[::-1])]
    (tmp_path / "c.txt").write_text("the ghost walks in the garden")
    files.append(str(tmp_path / "c.txt"))
    one = tokenize_data(files, tokenizer, num_proc=1)
    assert tokenize_data(files, tokenizer, num_proc=2) == one
    assert len(one.starts) == 82


def test_num_proc_must_not_be_negative(tokenizer):
    with pytest.raises(ConfigError, match="--num-proc must be >= 0"):
        TrainConfig(num_proc=-1).validate()
    with pytest.raises(ConfigError, match="--num-proc must be >= 0"):
        RecordTokenizer(tokenizer, [], num_proc=-1)
    assert record_workers.default_num_proc() >= 1


def test_a_resumed_run_may_use_other_num_proc(tmp_path):
    from qlora_ext.train.config import resume_config
    TrainConfig(output_dir=str(tmp_path), num_proc=0).save(str(tmp_path / "config.json"))
    assert resume_config(str(tmp_path), {"num_proc": 3}).num_proc == 3   # (it does not change the data)
