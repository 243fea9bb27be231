# SPDX-License-Identifier: Apache-2.0
"""Timing harness shared by every benchmark.

* Median (and p20/p80) of many timed calls after a warm-up.
* Inputs rotate over enough copies to exceed the last-level cache, so every call reads cold data.
* CPU: ``time.perf_counter_ns`` around each call. GPU: CUDA events around each call, with L2 flushed
  (a write over a buffer larger than L2) before it, and a GPU-side spin queued before the start
  event so that the host has enqueued the whole call before the GPU reaches it: the time is the
  device's alone, not host overhead (``bench/bench_dispatch_overhead.py`` measures that).
* ``CopyCase`` measures the limit for memory-bound kernels on the same device in
  the same run: ``dst.copy_(src)``, bytes read plus bytes written.
* ``time_interleaved`` times an op, its baselines (and the copy) call by call in alternation, so
  that a machine whose speed drifts during the run moves all of them alike: their ratios hold.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from fastlayers import _ext


def backend_label(device: torch.device, op: str) -> str:
    """What ``op`` runs on ``device`` in this build: the CPU kernel variant, the CUDA kernels, or
    the PyTorch reference (the label the benchmark tables show)."""
    if device.type == "cpu" and _ext.has_cpu_kernels():
        emulated = _ext.C.cpu_isa().startswith("avx512") and _ext.C.avx512_emulated()
        return f"fastlayers/{_ext.C.cpu_isa()}" + ("-simde-emulated" if emulated else "")
    if device.type == "cuda" and _ext.has_cuda_kernel(op):
        return "fastlayers/cuda"
    return "fastlayers/reference"


@dataclasses.dataclass
class Timing:
    median_s: float
    p20_s: float
    p80_s: float
    reps: int


def last_level_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).L2_cache_size)
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            text = f.read().strip()
        mult = {"K": 1 << 10, "M": 1 << 20}.get(text[-1], 1)
        return int(text.rstrip("KM")) * mult
    except (OSError, ValueError):
        return 64 << 20


def copies_to_exceed_cache(bytes_per_set: int, device: torch.device) -> int:
    """How many input sets to rotate through so that consecutive calls never hit in cache."""
    return max(1, -(-2 * last_level_cache_bytes(device) // max(bytes_per_set, 1)))


def _quantiles(samples: list[float]) -> Timing:
    samples = sorted(samples)
    q = statistics.quantiles(samples, n=10) if len(samples) >= 10 else [samples[0]] * 9
    return Timing(statistics.median(samples), q[1], q[7], len(samples))


def time_fn(
    fn: Callable,
    inputs: Sequence[tuple],
    device: torch.device,
    *,
    warmup: int = 3,
    reps: int = 20,
    min_time_s: float = 0.0,
) -> Timing:
    """Times ``fn(*inputs[i % len(inputs)])``: ``reps`` calls, more until ``min_time_s``."""
    _warm_up(fn, inputs, warmup)
    timer = _CallTimer(device)
    samples: list[float] = []
    start_all = time.perf_counter()
    i = 0
    while i < reps or (time.perf_counter() - start_all < min_time_s and i < 100 * reps):
        samples.append(timer(fn, inputs[i % len(inputs)]))
        i += 1
    return _quantiles(samples)


# Quick runs (``bench --quick``): each case of a measurement gets at most this many seconds of
# timed calls (its reps cut to fit, at least QUICK_MIN_REPS) and one warm-up call per input set, so
# that the slow baselines (a dense 4095-wide layer, an autograd backward: 0.1-0.3 s a call) do not
# take most of the run. None: every case gets its reps (full runs).
QUICK_CASE_S = 0.3
QUICK_MIN_REPS = 5
_case_budget_s: float | None = None

# torch.compile baselines (FFF, RMSNorm): each shape costs seconds to tens of seconds to compile;
# ``python -m fastlayers bench --no-compile`` leaves them out (a short GPU session's budget).
COMPILE_BASELINES = True


class quick_budget:
    """Context in which :func:`time_interleaved` applies the quick-run budget above."""

    def __init__(self, on: bool = True) -> None:
        self.on = on

    def __enter__(self):
        global _case_budget_s
        self.saved, _case_budget_s = _case_budget_s, (QUICK_CASE_S if self.on else None)
        return self

    def __exit__(self, *exc) -> None:
        global _case_budget_s
        _case_budget_s = self.saved


def _budgeted_reps(fn: Callable, inputs: Sequence[tuple], reps: int, warmup: int) -> int:
    """Warms ``fn`` up on every input set; returns its reps, cut to the quick budget if one is set
    (from the slowest warm-up call but the first)."""
    if _case_budget_s is None:
        _warm_up(fn, inputs, warmup)
        return reps
    times = []
    for i in range(max(1, len(inputs))):
        t0 = time.perf_counter()
        fn(*inputs[i % len(inputs)])
        times.append(time.perf_counter() - t0)
    per_call = max(times[1:] or times)
    fit = int(_case_budget_s / max(per_call, 1e-9))
    return max(min(reps, QUICK_MIN_REPS), min(reps, fit))


def time_interleaved(
    cases: Sequence[tuple[Callable, Sequence[tuple], int]],
    device: torch.device,
    *,
    warmup: int = 3,
) -> list[Timing]:
    """Times several calls against each other: ``cases`` holds ``(fn, inputs, reps)``; the calls
    of all cases alternate, each case's ``reps`` spread evenly over the whole measurement (a case
    with a quarter of the reps runs every fourth round). A machine whose speed drifts during the
    run (a shared VM: 20-50 % within minutes) then slows every case alike and the ratios between
    them hold, where timing one case after the other counts part of the drift as a speed-up.
    Each call is timed as in :func:`time_fn`. Under :class:`quick_budget`, slow cases get fewer
    reps (still spread over the run)."""
    cases = [(fn, inputs, _budgeted_reps(fn, inputs, reps, warmup)) for fn, inputs, reps in cases]
    # Call k of a case with r reps sits at (k + 0.5) / r of the run; calls at the same point run
    # in case order on even k and in reverse order on odd k (no case always follows another).
    schedule = sorted(
        ((k + 0.5) / max(r, 1), c if k % 2 == 0 else -c, c)
        for c, (_, _, r) in enumerate(cases)
        for k in range(max(r, 1))
    )
    timer = _CallTimer(device)
    samples: list[list[float]] = [[] for _ in cases]
    for j, (_, _, c) in enumerate(schedule):
        fn, inputs, _ = cases[c]
        # The j-th call of the run takes input set j: cases that share their inputs never read
        # the set the call before them just brought into cache.
        samples[c].append(timer(fn, inputs[j % len(inputs)]))
    return [_quantiles(s) for s in samples]


def _warm_up(fn: Callable, inputs: Sequence[tuple], warmup: int) -> None:
    for i in range(max(warmup, len(inputs))):  # every input set once: lazy setup stays untimed
        fn(*inputs[i % len(inputs)])


class _CallTimer:
    """Seconds of one ``fn(*args)``. CPU: ``perf_counter_ns`` around the call. CUDA: L2 flushed,
    a GPU-side spin queued so the host has enqueued the whole call before the GPU reaches it, and
    events around the call (the device's time alone)."""

    def __init__(self, device: torch.device) -> None:
        self.is_cuda = device.type == "cuda"
        self.flush = None
        self.spin_cycles = 0
        if self.is_cuda:
            # ~0.5 ms of spin, longer than any op's host overhead: the events bracket device work.
            khz = getattr(torch.cuda.get_device_properties(device), "clock_rate", 2_000_000)
            self.spin_cycles = int(khz * 1e3 * 5e-4)
            torch.cuda.synchronize(device)
            self.flush = torch.empty(
                2 * last_level_cache_bytes(device) // 4 + 1, dtype=torch.int32, device=device
            )

    def __call__(self, fn: Callable, args: tuple) -> float:
        if not self.is_cuda:
            t0 = time.perf_counter_ns()
            fn(*args)
            return (time.perf_counter_ns() - t0) * 1e-9
        self.flush.zero_()
        _spin(self.spin_cycles)
        begin = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        begin.record()
        fn(*args)
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) * 1e-3


def _spin(cycles: int) -> None:
    sleep = getattr(torch.cuda, "_sleep", None)  # private but long-standing; skip if it goes away
    if sleep is not None and cycles > 0:
        sleep(cycles)


class CopyCase:
    """``dst.copy_(src)`` of a ``nbytes`` source, the limit of memory-bound kernels: ``case(reps)``
    is a :func:`time_interleaved` case, ``bandwidth(timing)`` its bytes/s (read plus write)."""

    def __init__(self, nbytes: int, device: torch.device) -> None:
        n = max(nbytes // 4, 1)
        self.moved = 2 * n * 4
        self.pairs = [
            (
                torch.empty(n, dtype=torch.float32, device=device),
                torch.rand(n, dtype=torch.float32, device=device),
            )
            for _ in range(copies_to_exceed_cache(self.moved, device))
        ]

    @staticmethod
    def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src)

    def case(self, reps: int) -> tuple[Callable, Sequence[tuple], int]:
        return (self._copy, self.pairs, reps)

    def bandwidth(self, timing: Timing) -> float:
        return self.moved / timing.median_s


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} threads"


@dataclasses.dataclass
class Row:
    op: str
    shape: str
    dtype: str
    backend: str
    time_us: float
    baseline: str
    baseline_us: float
    gbps: float
    copy_fraction: float
    max_err: float
    # Peak memory above the steady state during one call, MiB (NaN: not measured).
    peak_mib: float = float("nan")
    baseline_peak_mib: float = float("nan")

    @property
    def speedup(self) -> float:
        return self.baseline_us / self.time_us

    def cells(self) -> list[str]:
        return [
            self.op,
            self.shape,
            self.dtype,
            self.backend,
            f"{self.time_us:.1f}",
            self.baseline,
            f"{self.baseline_us:.1f}",
            f"{self.speedup:.2f}x",
            f"{self.gbps:.1f}",
            f"{self.copy_fraction:.2f}",
            f"{self.max_err:.2e}",
        ]

    def memory_cells(self) -> list[str]:
        return [f"{self.peak_mib:.0f}", f"{self.baseline_peak_mib:.0f}"]


HEADER = [
    "op",
    "shape",
    "dtype",
    "backend",
    "time (us)",
    "baseline",
    "baseline (us)",
    "speed-up",
    "GB/s",
    "of copy BW",
    "max err vs ref",
]


MEMORY_HEADER = ["peak extra MiB", "baseline peak extra MiB"]


def format_table(rows: Sequence[Row], markdown: bool = False) -> str:
    """The table; the two memory columns only when some row measured memory."""
    memory = any(r.peak_mib == r.peak_mib for r in rows)
    header = HEADER + (MEMORY_HEADER if memory else [])
    cells = [header] + [r.cells() + (r.memory_cells() if memory else []) for r in rows]
    if markdown:
        lines = ["| " + " | ".join(c) + " |" for c in cells]
        lines.insert(1, "|" + "|".join("---" for _ in header) + "|")
        return "\n".join(lines)
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    return "\n".join("  ".join(c[i].ljust(widths[i]) for i in range(len(header))) for c in cells)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def peak_extra_mib(fn: Callable, args: tuple, device: torch.device) -> float:
    """Peak memory above the level before one ``fn(*args)`` call, MiB. CUDA: the caching allocator's
    peak. CPU: the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) over
    its resident set before the call; NaN where that is not available."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn(*args)
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current VmRSS
        before = _rss_kib("VmRSS")
        fn(*args)
        return (_rss_kib("VmHWM") - before) / 1024
    except OSError:
        return float("nan")


def write_csv(rows: Sequence[Row], path, meta: dict) -> None:
    """One line per row: the run's metadata, then every Row field and the speed-up, unrounded."""
    import csv

    names = [f.name for f in dataclasses.fields(Row)]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*meta, *names, "speedup"])
        for r in rows:
            w.writerow([*meta.values(), *dataclasses.astuple(r), r.speedup])
