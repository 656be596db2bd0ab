"""Pieces shared by the CUDA benchmarks: the device check, and CUDA-event timing (the median of many runs,
each starting with the L2 cache flushed by reading a 256 MB buffer outside the timed region (a read, not a
memset: zeroing would leave ~60 MB of dirty lines for the timed kernel to write back) and, optionally,
with the stream padded by a ~1 ms device-side sleep so the host's launch time stays out of the measurement)."""
import statistics
import time

import torch

FLUSH_BYTES = 256 << 20  # several times the H200's 60 MB L2


def cuda_unavailable_reason(name: str):
    """None when a CUDA device of compute capability 8.0+ and a CUDA build of qlora_ext are there, else the
    one-line reason the benchmark `name` cannot run."""
    if not torch.cuda.is_available():
        return (f"{name}: no CUDA device is available (torch.cuda.is_available() is False; torch "
                f"{torch.__version__}, CUDA build {torch.version.cuda}); run it on a machine with an NVIDIA GPU.")
    import qlora_ext

    if not qlora_ext.build_info().get("cuda"):
        return (f"{name}: qlora_ext was built without CUDA kernels (CPU-only build); rebuild it with CUDA "
                "available (pip install --no-build-isolation -e .).")
    props = torch.cuda.get_device_properties(0)
    if (props.major, props.minor) < (8, 0):
        return f"{name}: {props.name} is compute capability {props.major}.{props.minor}; qlora_ext needs 8.0+."
    return None


class Timer:
    """Median CUDA-event time of fn() with the L2 flushed (and the stream optionally padded) before each run."""

    def __init__(self, reps: int, warmup: int, pad: bool, device: str = "cuda"):
        self.reps, self.warmup = reps, warmup
        self.flush = torch.zeros(FLUSH_BYTES // 4, dtype=torch.float32, device=device)
        self.flush_sink = torch.empty((), dtype=torch.float32, device=device)
        self.pad_cycles = self._calibrate_pad() if pad else 0

    def flush_l2(self) -> None:
        """Reads the whole buffer (a sum into a preallocated scalar): evicts the L2, leaves no dirty lines."""
        torch.sum(self.flush, 0, out=self.flush_sink)

    @staticmethod
    def _calibrate_pad(target_ms: float = 1.0) -> int:
        # torch.cuda._sleep spins for a number of clock cycles; find how many make ~target_ms.
        cycles = 1_000_000
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(cycles)  # warm-up
        s.record()
        torch.cuda._sleep(cycles)
        e.record()
        torch.cuda.synchronize()
        ms = max(s.elapsed_time(e), 1e-3)
        return int(cycles * target_ms / ms)

    def __call__(self, fn) -> dict:
        for _ in range(self.warmup):
            fn()
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        t0 = time.perf_counter()
        for i in range(self.reps):
            self.flush_l2()  # outside the timed region
            if self.pad_cycles:
                torch.cuda._sleep(self.pad_cycles)  # keeps the GPU busy while the host queues the timed region
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        ms = [s.elapsed_time(e) for s, e in zip(starts, ends)]
        return {"median_s": statistics.median(ms) / 1e3, "min_s": min(ms) / 1e3, "max_s": max(ms) / 1e3,
                "runs": self.reps, "loop_wall_s": wall}


class HostTimer:
    """Wall-clock stand-in for Timer in a benchmark's CPU debug run (--device cpu): exercises the benchmark's
    own code where no CUDA device is; its times mean nothing for the GPU."""

    def __init__(self, reps: int, warmup: int):
        self.reps, self.warmup = reps, warmup

    def __call__(self, fn) -> dict:
        for _ in range(self.warmup):
            fn()
        ts = []
        for _ in range(self.reps):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "runs": self.reps,
                "loop_wall_s": sum(ts)}
