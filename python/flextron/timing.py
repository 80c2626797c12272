"""The one timer: latency tables, the demo and every benchmark measure with it.

Several callables are timed interleaved (A B C A B C ...), so a busy neighbour or a clock
change hits all of them alike; each sample is one call, after ``warmup`` calls of each. On
a GPU the samples are CUDA event pairs and the L2 cache is flushed before each one (a
kernel that finds its operands in L2 from the previous call would look faster than it is
in a model); on the CPU they are ``perf_counter`` intervals. Results are percentiles (p20,
median, p80) and, on a GPU, each callable's peak memory beyond what was allocated before.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

L2_FLUSH_MB = 256  # more than any current GPU's L2 (H100/H200: 50 MB)


@dataclass(frozen=True)
class Stats:
    """Milliseconds per call: median and the 20th/80th percentiles of ``n`` samples, and the
    peak memory of one call in MiB (None on the CPU)."""

    median: float
    p20: float
    p80: float
    n: int
    peak_mib: float | None = None


def summarize(samples: list[float], peak_mib: float | None = None) -> Stats:
    if len(samples) < 2:
        return Stats(samples[0], samples[0], samples[0], len(samples), peak_mib)
    q = statistics.quantiles(samples, n=5, method="inclusive")  # the 20/40/60/80th percentiles
    return Stats(statistics.median(samples), q[0], q[3], len(samples), peak_mib)


class Timer:
    """Times callables on ``device`` (``"cpu"``, ``"cuda"`` or a torch.device); see the
    module docstring. ``flush_mb=0`` turns the L2 flush off."""

    def __init__(self, device: str | torch.device, flush_mb: int = L2_FLUSH_MB) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.flush_buffer = (
            torch.empty(flush_mb * 2**20 // 4, dtype=torch.int32, device=self.device)
            if self.cuda and flush_mb
            else None
        )

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def measure(
        self, fns: dict[str, Callable[[], object]], repeat: int = 10, warmup: int = 3
    ) -> dict[str, Stats]:
        """``{name: Stats}`` of each callable, timed interleaved."""
        peaks = {name: self._peak_mib(fn) for name, fn in fns.items()}
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        self.sync()
        samples: dict[str, list[float]] = {name: [] for name in fns}
        events = []
        for _ in range(repeat):
            for name, fn in fns.items():
                if self.flush_buffer is not None:
                    self.flush_buffer.zero_()
                if self.cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn()
                    end.record()
                    events.append((name, start, end))
                else:
                    t0 = time.perf_counter()
                    fn()
                    samples[name].append((time.perf_counter() - t0) * 1e3)
        self.sync()
        for name, start, end in events:
            samples[name].append(start.elapsed_time(end))
        return {name: summarize(values, peaks[name]) for name, values in samples.items()}

    def _peak_mib(self, fn: Callable[[], object]) -> float | None:
        if not self.cuda:
            return None
        self.sync()
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        fn()
        self.sync()
        return (torch.cuda.max_memory_allocated(self.device) - before) / 2**20


def median_ms(
    fn: Callable[[], object], device: str | torch.device, warmup: int = 2, repeat: int = 7
) -> float:
    """The median milliseconds of one callable (no L2 flush: a latency table times layers as
    they run inside a model, where the previous layer's data is in the cache)."""
    return Timer(device, flush_mb=0).measure({"fn": fn}, repeat, warmup)["fn"].median


def stats_columns(stats: dict[str, Stats], prefix: str = "") -> dict[str, float | None]:
    """A result row's columns: ``{name}_ms`` (median), ``{name}_p20_ms``, ``{name}_p80_ms``,
    and ``{name}_peak_mib`` on a GPU."""
    row: dict[str, float | None] = {}
    for name, s in stats.items():
        row[f"{prefix}{name}_ms"] = s.median
        row[f"{prefix}{name}_p20_ms"] = s.p20
        row[f"{prefix}{name}_p80_ms"] = s.p80
        if s.peak_mib is not None:
            row[f"{prefix}{name}_peak_mib"] = round(s.peak_mib, 2)
    return row
