"""Record files tokenized (instructions.py renders and tokenizes each record), by several processes with
--num-proc, as datasets' map(num_proc=) does for TRL: chat templates are Python (Jinja), so one process renders
some 2,000 conversations a second, and a file of millions takes minutes.

The examples, their order and the first error are exactly those of one process (tokenize_record_file): this process
reads the records and hands batches of them, in order, to the workers; the results are taken back in the order
the batches were sent. Workers start only once a file turns out to be large (START_AFTER records), so small
files and the demo never wait for them; they are forked (_start_pool says why) and tokenize on one thread each.
"""
from __future__ import annotations

import collections
import concurrent.futures
import multiprocessing
import os
import signal
from typing import List, Optional, Sequence, Tuple

from .config import ConfigError
from .instructions import checked_render, tokenize_rendered
from .records import read_records

Example = Tuple[List[int], List[bool]]

TOKENIZE_BATCH = 512   # records rendered, then tokenized in one call (a fast tokenizer's threads share them)
# Records read before workers are started: a second or so of work in this process
START_AFTER = 4 * TOKENIZE_BATCH
IN_FLIGHT_PER_WORKER = 2   # batches queued per worker: enough to keep it busy, few enough to bound memory


def default_num_proc() -> int:
    """--num-proc 0: one worker per CPU this process may run on (its affinity, and a container's CPU quota, cgroup
    v2's cpu.max), at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:   # (not on Linux)
        cpus = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return max(1, min(cpus, 8))


_tokenizer = None
_prefix: Optional[List[int]] = None


def _start_worker(tokenizer, prefix: Optional[List[int]]) -> None:
    global _tokenizer, _prefix
    os.environ["TOKENIZERS_PARALLELISM"] = "false"   # the processes share the CPUs, not each one's threads
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C stops the run: the parent stops the workers
    _tokenizer, _prefix = tokenizer, prefix


def _work(batch: List[Tuple[str, object]]) -> List[Example]:
    return tokenize_batch(_tokenizer, batch, _prefix)


def tokenize_batch(tokenizer, batch: Sequence[Tuple[str, object]], prefix: Optional[Sequence[int]]) -> List[Example]:
    """The examples of a batch of (where, record): rendered one by one, tokenized in one call; the first record
    that fails is the error, whether rendering or tokenizing failed."""
    rendered = []
    for where, record in batch:
        try:
            rendered.append(checked_render(tokenizer, record, where))
        except ConfigError:
            if rendered:   # a record before it that the tokenizer refuses is the first error
                tokenize_rendered(tokenizer, rendered, prefix)
            raise
    return tokenize_rendered(tokenizer, rendered, prefix)


def tokenize_record_file(path: str, tokenizer, prefix: Optional[Sequence[int]] = None) -> List[Example]:
    """The examples of a file of records (.jsonl, .json or .parquet: records.py), in order, in this process:
    (token ids, trained flag per token) each, framed with `prefix` (instructions.tokenize_rendered). A record that
    cannot be read, is not of a known format, or that the tokenizer or its chat template cannot take is an error
    naming its line or row."""
    with RecordTokenizer(tokenizer, prefix, num_proc=1) as one:
        return one.file(path)


class RecordTokenizer:
    """Tokenizes record files (file()) with up to num_proc processes (0: default_num_proc(); 1: this one only).
    A context manager: leaving it stops the workers."""

    def __init__(self, tokenizer, prefix: Optional[Sequence[int]], num_proc: int = 0):
        if num_proc < 0:
            raise ConfigError(f"--num-proc must be >= 0 (0: one per CPU core), got {num_proc}")
        self.tokenizer = tokenizer
        self.prefix = None if prefix is None else list(prefix)
        self.num_proc = num_proc or default_num_proc()
        self.executor: Optional[concurrent.futures.ProcessPoolExecutor] = None

    def __enter__(self) -> "RecordTokenizer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stops the workers: batches not started are dropped, those started finish first (a batch is a
        fraction of a second; a pool's terminate() can deadlock on a worker that holds its queue's lock)."""
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
            self.executor = None

    def _submit(self, batch) -> concurrent.futures.Future:
        """Sends a batch to the workers, started at the first: forked, as datasets' map(num_proc=) forks them (a
        spawned process would import the user's main script again, an error without its `if __name__ ==
        "__main__":`, and torch with it), with TOKENIZERS_PARALLELISM=false (the tokenizer's threads do not
        survive a fork: tokenizers would warn, in each worker, that it turns them off)."""
        if self.executor is not None:
            return self.executor.submit(_work, batch)
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        self.executor = concurrent.futures.ProcessPoolExecutor(
            self.num_proc, mp_context=context, initializer=_start_worker, initargs=(self.tokenizer, self.prefix))
        saved = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        try:
            return self.executor.submit(_work, batch)   # (a forking executor starts all its workers here)
        finally:
            if saved is None:
                del os.environ["TOKENIZERS_PARALLELISM"]
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = saved

    @property
    def workers(self) -> int:
        """The worker processes started so far (0: everything ran in this process)."""
        return 0 if self.executor is None else self.num_proc

    def file(self, path: str) -> List[Example]:
        """The examples of a file of records, as tokenize_record_file gives them (the same first error too)."""
        examples: List[Example] = []
        pending: collections.deque = collections.deque()   # the batches sent, in order
        batch: List[Tuple[str, object]] = []
        seen = 0

        def collect(future: concurrent.futures.Future) -> None:
            try:
                examples.extend(future.result())
            except concurrent.futures.process.BrokenProcessPool as e:
                raise ConfigError(f"{path}: a process tokenizing it stopped ({e}); out of memory? --num-proc "
                                  f"{max(self.num_proc // 2, 1)} starts fewer") from e

        def send(batch):
            if self.executor is None and (self.num_proc == 1 or seen < START_AFTER):
                examples.extend(tokenize_batch(self.tokenizer, batch, self.prefix))
                return
            pending.append(self._submit(batch))
            while len(pending) > IN_FLIGHT_PER_WORKER * self.num_proc:
                collect(pending.popleft())

        records = read_records(path)
        while True:
            try:
                where, record = next(records)
            except StopIteration:
                break
            except Exception:   # a record that cannot be read: the records before it, and their errors, first
                while pending:
                    collect(pending.popleft())
                if batch:
                    examples.extend(tokenize_batch(self.tokenizer, batch, self.prefix))
                raise
            batch.append((where, record))
            seen += 1
            if len(batch) == TOKENIZE_BATCH:
                send(batch)
                batch = []
        if batch:
            send(batch)
        while pending:
            collect(pending.popleft())
        if not examples:
            raise ConfigError(f"{path} holds no examples")
        return examples
