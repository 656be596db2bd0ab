"""Record files tokenized (instructions.py renders and tokenizes each record), by several processes with
--num-proc, as datasets' map(num_proc=) does for TRL: chat templates are Python (Jinja), so one process renders
some 2,000 conversations a second, and a file of millions takes minutes.

The examples, their order and the first error are exactly those of one process (tokenize_record_file): this process
reads the records and hands batches of them, in order, to the workers; the results are taken back in the order
the batches were sent. Workers start only once a file turns out to be large (START_AFTER records), so small
files and the demo never wait for them; they are forked (RecordTokenizer._submit says why), tokenize on one
thread each, ignore Ctrl-C (the parent kills them on any error or interrupt, without waiting for their batches),
and die with the parent (Linux's parent-death signal: a parent killed by SIGKILL leaves no orphans).
"""
from __future__ import annotations

import collections
import concurrent.futures
import multiprocessing
import os
import signal
from concurrent.futures.process import BrokenProcessPool   # (not an attribute until that module loads)
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


def _die_with_parent(parent: int) -> None:
    """Linux: SIGKILL this process when its parent dies (prctl PR_SET_PDEATHSIG); elsewhere nothing."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)   # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:   # the parent died before the prctl
        os._exit(1)


def _start_worker(tokenizer, prefix: Optional[List[int]], parent: int) -> None:
    global _tokenizer, _prefix
    os.environ["TOKENIZERS_PARALLELISM"] = "false"   # the processes share the CPUs, not each one's threads
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C stops the run: the parent stops the workers
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})   # (blocked by the parent across the fork)
    _die_with_parent(parent)
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
    """The examples of a file of records (.jsonl, .json, .parquet or .arrow: records.py), in order, in this process:
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

    def __exit__(self, exc_type, *exc) -> None:
        self.close(abort=exc_type is not None)

    def close(self, abort: bool = True) -> None:
        """Stops the workers. abort (an error, Ctrl-C): they are killed at once, their batches dropped (waiting
        for them would make Ctrl-C slow, and a second Ctrl-C during the wait can hang the interpreter's exit);
        otherwise they finish what they hold (nothing, after file() returned) and exit."""
        if self.executor is None:
            return
        executor, self.executor = self.executor, None
        if abort:
            for process in list((getattr(executor, "_processes", None) or {}).values()):
                process.kill()
            executor.shutdown(wait=False, cancel_futures=True)
        else:
            executor.shutdown(wait=True, cancel_futures=True)

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
            self.num_proc, mp_context=context, initializer=_start_worker,
            initargs=(self.tokenizer, self.prefix, os.getpid()))
        saved = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        # SIGINT blocked across the fork: a worker interrupted before it ignores Ctrl-C would look like a broken pool
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            return self.executor.submit(_work, batch)   # (a forking executor starts all its workers here)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
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
        try:
            return self._tokenize_file(path)
        except BrokenProcessPool as e:   # (from a result, or from a submit)
            raise ConfigError(f"{path}: a process tokenizing it stopped ({e}); out of memory? --num-proc "
                              f"{max(self.num_proc // 2, 1)} starts fewer") from e

    def _tokenize_file(self, path: str) -> List[Example]:
        examples: List[Example] = []
        pending: collections.deque = collections.deque()   # the batches sent to the workers, in order
        batch: List[Tuple[str, object]] = []
        seen = 0

        def send(batch: List[Tuple[str, object]]) -> None:
            if self.executor is None and (self.num_proc == 1 or seen < START_AFTER):
                examples.extend(tokenize_batch(self.tokenizer, batch, self.prefix))
                return
            pending.append(self._submit(batch))
            while len(pending) > IN_FLIGHT_PER_WORKER * self.num_proc:
                examples.extend(pending.popleft().result())

        records = read_records(path)
        while True:
            try:
                where, record = next(records)
            except StopIteration:
                break
            except Exception:   # a record that cannot be read: the records before it, and their errors, first
                while pending:
                    examples.extend(pending.popleft().result())
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
            examples.extend(pending.popleft().result())
        if not examples:
            raise ConfigError(f"{path} holds no examples")
        return examples
