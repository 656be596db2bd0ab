"""Packing whole examples into fixed-length blocks, best fit decreasing (TRL's "bfd" packing): examples longest
first, each into the open block it fills most tightly, the rest of a block padded. Each example keeps its own
position ids (0, 1, ...), from which transformers' attention masks (masking_utils) keep every token's attention
within its example, so packed examples train as if each were alone in its batch row.

An example longer than a block is cut into block-sized pieces and a remainder, each packed as an example (a
piece after the first starts without the text before it, as in wrapped packing). The first token of every piece
and the padding are not trained on: nothing in the block predicts them.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence

import numpy as np
import torch

IGNORE = -100   # the label of a token that is not trained on (the loss skips it)


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> List[List[int]]:
    """Bins of item indices whose lengths add up to at most capacity: items longest first (ties in their order),
    each into the open bin with the least room that still holds it, or a new bin. O(n log capacity): a max
    segment tree over the room sizes finds the smallest room >= an item's length."""
    if any(not 0 < n <= capacity for n in lengths):
        raise ValueError(f"every length must be in [1, {capacity}]")
    size = 1
    while size <= capacity:
        size *= 2
    tree = [0] * (2 * size)     # leaf `size + room`: room while some open bin has exactly that room, else 0
    with_room: List[List[int]] = [[] for _ in range(capacity + 1)]   # open bins by their room

    def set_leaf(room: int, value: int) -> None:
        i = size + room
        tree[i] = value
        i //= 2
        while i:
            tree[i] = max(tree[2 * i], tree[2 * i + 1])
            i //= 2

    bins: List[List[int]] = []
    for item in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        n = lengths[item]
        if tree[1] >= n:            # the leftmost leaf >= n: the smallest room that holds the item
            i = 1
            while i < size:
                i = 2 * i if tree[2 * i] >= n else 2 * i + 1
            room = i - size
            b = with_room[room].pop()
            if not with_room[room]:
                set_leaf(room, 0)
        else:
            b, room = len(bins), capacity
            bins.append([])
        bins[b].append(item)
        room -= n
        if room:
            if not with_room[room]:
                set_leaf(room, room)
            with_room[room].append(b)
    return bins


@dataclasses.dataclass
class PackedExamples:
    ids: torch.Tensor           # int64 [blocks, seq_len]
    labels: torch.Tensor        # int64 [blocks, seq_len]: the ids, IGNORE where not trained on
    positions: torch.Tensor     # int64 [blocks, seq_len]: each example's (and the padding's) own 0, 1, ...
    examples: int               # examples packed
    split_examples: int         # of them, longer than seq_len and cut into pieces
    padding: torch.Tensor       # int64 [blocks]: the padding tokens at the end of each block


def pack_examples(ids: Sequence[int], trained: Optional[Sequence[bool]], starts: Sequence[int], seq_len: int,
                  pad_id: int) -> PackedExamples:
    """The examples ids[starts[k]:starts[k + 1]] (the last to the end; trained: a flag per token, None: all
    trained) packed best fit decreasing into blocks of seq_len, padded with pad_id."""
    tokens = np.asarray(ids, dtype=np.int64)
    flags = np.ones(len(tokens), dtype=bool) if trained is None else np.asarray(trained, dtype=bool)
    bounds = list(starts) + [len(tokens)]
    pieces, split = [], 0
    for a, b in zip(bounds, bounds[1:]):
        split += b - a > seq_len
        pieces += [(s, min(s + seq_len, b)) for s in range(a, b, seq_len)]
    bins = best_fit_decreasing([b - a for a, b in pieces], seq_len)
    out_ids = np.full((len(bins), seq_len), pad_id, dtype=np.int64)
    out_labels = np.full((len(bins), seq_len), IGNORE, dtype=np.int64)
    out_pos = np.empty((len(bins), seq_len), dtype=np.int64)
    padding = np.zeros(len(bins), dtype=np.int64)
    for row, items in enumerate(bins):
        at = 0
        for item in items:
            a, b = pieces[item]
            out_ids[row, at:at + b - a] = tokens[a:b]
            out_labels[row, at:at + b - a] = np.where(flags[a:b], tokens[a:b], IGNORE)
            out_labels[row, at] = IGNORE        # predicted from nothing in its example
            out_pos[row, at:at + b - a] = np.arange(b - a)
            at += b - a
        out_pos[row, at:] = np.arange(seq_len - at)   # the padding: a sequence of its own
        padding[row] = seq_len - at
    return PackedExamples(torch.from_numpy(out_ids), torch.from_numpy(out_labels), torch.from_numpy(out_pos),
                          len(bounds) - 1, split, torch.from_numpy(padding))
