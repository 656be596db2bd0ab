"""Files of instruction records (qlora_ext/train/records.py): .jsonl, .json (an array, or JSON Lines under that
name) and .parquet (rows, list-of-struct "messages" columns, columns a row does not use) read as the same
examples, and bad files give errors naming the file and the line, record or row."""
import json

import pytest

from qlora_ext.train.config import ConfigError
from qlora_ext.train.data import find_text_files, resolve_packing
from qlora_ext.train.records import read_records

RECORDS = [{"prompt": "the ghost", "completion": " speaks"},
           {"messages": [{"role": "user", "content": "who"}, {"role": "assistant", "content": "the king"}]},
           {"text": "the queen walks", "id": 7}]


def _write(tmp_path, name, records=RECORDS):
    path = tmp_path / name
    if name.lower().endswith((".parquet", ".arrow")):
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq
        keys = list(dict.fromkeys(k for r in records for k in r))   # every column in every row, as datasets writes
        table = pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in records])
        if name.lower().endswith(".parquet"):
            pq.write_table(table, str(path), row_group_size=2)
        else:   # datasets' save_to_disk shards are IPC streams; the IPC file format reads too
            writer = (pa.ipc.new_file if "file" in name else pa.ipc.new_stream)(str(path), table.schema)
            for batch in table.to_batches(max_chunksize=2):
                writer.write_batch(batch)
            writer.close()
    elif name.endswith(".json") and "lines" not in name:
        path.write_text(json.dumps(records, indent=1))
    else:
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    return str(path)


@pytest.mark.parametrize("name", ["r.jsonl", "r.json", "r_lines.json", "r.parquet", "R.PARQUET", "r.arrow",
                                  "r_file.arrow"])
def test_every_format_reads_the_same_records(tmp_path, name):
    got = [record for _, record in read_records(_write(tmp_path, name))]
    if name.lower().endswith((".parquet", ".arrow")):   # only the columns a record can use are read ("id" is not)
        assert got == [{k: v for k, v in r.items() if k != "id"} for r in RECORDS]
    else:
        assert got == RECORDS   # (parquet: the columns a row does not use are left out, not None)
    assert resolve_packing("auto", [name]) == "bfd"


def test_folders_find_record_files(tmp_path):
    for name in ("a.jsonl", "b.json", "c.parquet", "d.txt", "e.md", "f.arrow"):
        (tmp_path / name).write_text("x")
    # not .json, which folders hold for other reasons (a dataset's dataset_info.json): named on its own
    assert [f.rsplit("/", 1)[1] for f in find_text_files([str(tmp_path)])] == ["a.jsonl", "c.parquet", "d.txt",
                                                                               "f.arrow"]
    assert find_text_files([str(tmp_path / "b.json")]) == [str(tmp_path / "b.json")]


def test_where_names_the_line_record_or_row(tmp_path):
    assert [w for w, _ in read_records(_write(tmp_path, "r.jsonl"))] == [f"{tmp_path}/r.jsonl:{i}" for i in (1, 2, 3)]
    assert [w for w, _ in read_records(_write(tmp_path, "r.json"))][-1] == f"{tmp_path}/r.json: record 3"
    pytest.importorskip("pyarrow")
    assert [w for w, _ in read_records(_write(tmp_path, "r.parquet"))][-1] == f"{tmp_path}/r.parquet: row 3"


def test_bad_files_give_errors_naming_them(tmp_path, monkeypatch):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"text": "a"},\n {"text": }]')
    with pytest.raises(ConfigError, match=r"bad.json:2: not valid JSON"):
        list(read_records(str(bad)))
    bad.write_text('{"text": "a"}\n{"text": ]\n')   # JSON Lines under a .json name
    with pytest.raises(ConfigError, match=r"bad.json:2: not valid JSON"):
        list(read_records(str(bad)))
    bad.write_text('[1, 2')
    with pytest.raises(ConfigError, match="bad.json"):
        list(read_records(str(bad)))
    scalar = tmp_path / "scalar.json"
    scalar.write_text('"text"')
    with pytest.raises(ConfigError, match="scalar.json: a .json file must hold an array of records.*str"):
        list(read_records(str(scalar)))
    pretty = tmp_path / "pretty.json"   # one record, laid out over lines: one record, not JSON Lines
    pretty.write_text(json.dumps(RECORDS[0], indent=2))
    assert list(read_records(str(pretty))) == [(f"{pretty}: record 1", RECORDS[0])]
    empty = tmp_path / "empty.json"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="empty.json is empty"):
        list(read_records(str(empty)))
    spaced = tmp_path / "spaced.json"   # however much space comes before the array
    spaced.write_text(" " * 10000 + json.dumps(RECORDS))
    assert [r for _, r in read_records(str(spaced))] == RECORDS
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet")
    pytest.importorskip("pyarrow")
    with pytest.raises(ConfigError, match="broken.parquet: not a readable parquet file"):
        list(read_records(str(broken)))
    import sys
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)   # pyarrow not installed
    with pytest.raises(ConfigError, match="needs pyarrow"):
        list(read_records(str(broken)))


def test_a_parquet_file_trains_like_its_jsonl(tmp_path):
    """The same records as .jsonl and .parquet give the same tokens and labels."""
    pytest.importorskip("pyarrow")
    transformers = pytest.importorskip("transformers")
    from tests.test_instructions import CHATML
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["the king speaks to the ghost"] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")
    fast.chat_template = CHATML
    from qlora_ext.train.data import tokenize_data
    a = tokenize_data([_write(tmp_path, "r.jsonl")], fast)
    b = tokenize_data([_write(tmp_path, "r.parquet")], fast)
    assert (a.ids, a.trained, a.starts) == (b.ids, b.trained, b.starts) and len(a.starts) == 3


def test_a_datasets_save_to_disk_folder_is_data_and_a_dataset_dict_is_refused(tmp_path):
    """A Dataset saved with save_to_disk: Arrow shards (IPC streams) beside dataset_info.json and state.json, read
    in shard order; a DatasetDict (a folder per split) would mix the splits, and is refused naming them."""
    split = tmp_path / "dd" / "train"
    split.mkdir(parents=True)
    (tmp_path / "dd" / "test").mkdir()
    (tmp_path / "dd" / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    for i, records in enumerate((RECORDS[:2], RECORDS[2:])):
        _write(split, f"data-{i:05d}-of-00002.arrow", records)
    (split / "dataset_info.json").write_text("{}")
    (split / "state.json").write_text("{}")
    files = find_text_files([str(split)])
    assert [f.rsplit("/", 1)[1] for f in files] == ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    got = [r for f in files for _, r in read_records(f)]
    assert got == [{k: v for k, v in r.items() if k != "id"} for r in RECORDS]
    with pytest.raises(ConfigError, match=r"holds a datasets DatasetDict \(save_to_disk of the splits "
                                          r"\['train', 'test'\]\): give one split's folder, e.g. '.*train'"):
        find_text_files([str(tmp_path / "dd")])
    (tmp_path / "bad.arrow").write_bytes(b"not arrow")
    with pytest.raises(ConfigError, match="bad.arrow: not a readable Arrow file"):
        list(read_records(str(tmp_path / "bad.arrow")))
    # cut inside its second batch (as a copy stopped half way): the rows before it, then an error naming the file
    whole = (split / "data-00000-of-00002.arrow").read_bytes()
    (tmp_path / "cut.arrow").write_bytes(whole[:len(whole) - 40])
    rows = read_records(str(tmp_path / "cut.arrow"))
    with pytest.raises(ConfigError, match=r"cut.arrow: not a readable Arrow file after row \d"):
        list(rows)


def test_a_save_to_disk_folder_is_its_listed_shards_not_datasets_cache_files(tmp_path):
    """After load_from_disk(folder).map(...), datasets leaves cache-*.arrow files in the folder: the dataset is the
    shards its state.json lists, in that order."""
    for i, records in enumerate((RECORDS[:2], RECORDS[2:])):
        _write(tmp_path, f"data-{i:05d}-of-00002.arrow", records)
    _write(tmp_path, "cache-0123abcd.arrow", RECORDS)   # sorts first: it would come first, and twice the data
    (tmp_path / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00001-of-00002.arrow"},
                                                                     {"filename": "data-00000-of-00002.arrow"}]}))
    (tmp_path / "notes.txt").write_text("a text file beside it is still data")
    names = [f.rsplit("/", 1)[1] for f in find_text_files([str(tmp_path)])]
    assert names == ["data-00001-of-00002.arrow", "data-00000-of-00002.arrow", "notes.txt"]
