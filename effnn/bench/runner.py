"""Timing and memory measurement for ``effnn bench``.

Method (chosen for noisy, shared machines):

- every provider of a case (the dense baseline, effnn with each backend) is built once; for each
  mode the providers are warmed up, then *interleaved*: repetition i runs each provider once, the
  order rotated by one every repetition, so slow drifts of the machine hit all of them alike;
- ``median_ms``, ``p20_ms``, ``p80_ms`` are over the repetitions; ``speedup_vs_baseline`` is the
  median over repetitions of (baseline time / provider time) within the same repetition;
- a sample shorter than ``MIN_SAMPLE_S`` (tiny shapes) is the mean of enough back-to-back calls to
  last that long; the garbage collector is off while timing;
- ``forward`` runs under ``torch.no_grad()``; ``forward+backward`` runs ``fn(*inputs).backward(g)``
  with a fixed random ``g``, the floating-point inputs requiring grad and every grad set to None
  before each call (as ``zero_grad(set_to_none=True)``);
- CPU times come from ``time.perf_counter``; CUDA times from CUDA events around the calls;
- ``peak_memory_mb`` (forward+backward only) is the peak of the memory held by tensors allocated
  during one training step, above what was allocated when it began: activations saved for the
  backward, temporaries, the output and the gradients (grads are None before the step). CUDA:
  ``torch.cuda.max_memory_allocated``. CPU: PyTorch's CPU allocator events recorded by
  ``torch.profiler`` with ``profile_memory=True``, so buffers allocated inside kernels and
  extensions count too. It is taken on the last (untimed) warm-up call.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TextIO

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from effnn.bench.registry import BASELINE, FORWARD, TRAIN, Case, Layer, Setting, Workload
from effnn.ops._dispatch import BackendError

MIN_SAMPLE_S = 0.01
MAX_NUMBER = 10_000


def provider_name(layer: Layer, request: str) -> str:
    """Name of a provider in the results: the baseline's name, "effnn" (auto) or "effnn-<backend>"."""
    if request == BASELINE:
        return layer.baseline
    return "effnn" if request == "auto" else f"effnn-{request}"


# ---------------------------------------------------------------------------------------------
# Which backend ran: read from the `backend` argument of the effnn:: ops a call dispatches.
# ---------------------------------------------------------------------------------------------


class _BackendProbe(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "namespace", None) == "effnn":
            for i, arg in enumerate(func._schema.arguments):
                if arg.name == "backend":
                    value = kwargs.get("backend", args[i] if i < len(args) else None)
                    if isinstance(value, str) and value not in self.seen:
                        self.seen.append(value)
        return func(*args, **kwargs)


def first_call(w: Workload) -> str:
    """Call the workload once (no grad) and return the backend that served it."""
    with torch.no_grad():
        if w.backend is not None:
            w.fn(*w.inputs)
            return w.backend
        probe = _BackendProbe()
        with probe:
            w.fn(*w.inputs)
    return "+".join(probe.seen) if probe.seen else "?"


# ---------------------------------------------------------------------------------------------
# Steps and timers
# ---------------------------------------------------------------------------------------------


@dataclass
class Step:
    """``run()`` is one call in a mode; ``zero()`` (training only) sets every grad to None."""

    run: Callable[[], object]
    zero: Callable[[], None] | None


def make_step(w: Workload, mode: str) -> Step:
    """The timed call of ``w`` in ``mode`` (:data:`FORWARD` or :data:`TRAIN`)."""
    fn, inputs = w.fn, w.inputs
    if mode == FORWARD:

        def forward() -> None:
            with torch.no_grad():
                fn(*inputs)

        return Step(forward, None)
    leaves = [t for t in inputs if t.is_floating_point() or t.is_complex()]
    for t in leaves:
        t.requires_grad_(True)
    leaves += w.parameters()
    with torch.no_grad():
        out = fn(*inputs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, out.dtype)

    def zero() -> None:
        for t in leaves:
            t.grad = None

    def train() -> None:
        fn(*inputs).backward(g)

    return Step(train, zero)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(step: Step, number: int, device: torch.device) -> float:
    """Seconds per call, over ``number`` back-to-back calls (grads zeroed before each)."""
    if step.zero is not None:
        step.zero()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        _sync(device)
        start.record()
        for i in range(number):
            if i and step.zero is not None:
                step.zero()
            step.run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / number
    t0 = time.perf_counter()
    for i in range(number):
        if i and step.zero is not None:
            step.zero()
        step.run()
    _sync(device)
    return (time.perf_counter() - t0) / number


@contextlib.contextmanager
def _gc_off() -> Iterator[None]:
    gc.collect(1)  # the young generations; a full collection runs once per case
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def interleaved_times(
    steps: Sequence[Step], repeats: int, warmup: int, device: torch.device
) -> list[list[float]]:
    """``times[p][i]``: seconds per call of step p in repetition i (order rotated each repetition)."""
    return measure(steps, repeats, warmup, device)[0]


def measure(
    steps: Sequence[Step], repeats: int, warmup: int, device: torch.device, memory: bool = False
) -> tuple[list[list[float]], list[int | None]]:
    """Interleaved times as :func:`interleaved_times`, and with ``memory`` the peak memory of one
    call of each step (:func:`peak_memory_bytes`), taken in the last warm-up round so that it
    costs no extra call of a long step."""
    n = len(steps)
    numbers = [1] * n
    peaks: list[int | None] = [None] * n
    rounds = max(warmup, 1)
    with _gc_off():
        for r in range(rounds):
            for p, step in enumerate(steps):
                t = None
                if memory and r == rounds - 1:
                    t0 = time.perf_counter()
                    peaks[p] = peak_memory_bytes(step, device)
                    t = time.perf_counter() - t0
                    if t < MIN_SAMPLE_S:  # short step: calibrate on a call without the profiler
                        t = None
                if t is None:
                    t = _time(step, 1, device)
                numbers[p] = max(1, min(MAX_NUMBER, math.ceil(MIN_SAMPLE_S / max(t, 1e-9))))
        times: list[list[float]] = [[] for _ in steps]
        for i in range(repeats):
            for j in range(n):
                p = (i + j) % n
                times[p].append(_time(steps[p], numbers[p], device))
    return times, peaks


# ---------------------------------------------------------------------------------------------
# Peak memory of one training step
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _silence_stderr_fd() -> Iterator[None]:
    """Silence C-level writes to fd 2 (the profiler logs its start and stop there)."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_memory_bytes(step: Step, device: torch.device) -> int | None:
    """Peak bytes held by tensors allocated during one call of ``step``, above the start level."""
    if step.zero is not None:
        step.zero()
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step.run()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    if device.type != "cpu":
        return None
    try:
        from torch.profiler import ProfilerActivity, profile

        with _silence_stderr_fd():
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                step.run()
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except Exception:  # a build without the profiler: report nothing rather than a wrong number
        return None
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


# ---------------------------------------------------------------------------------------------
# Running cases
# ---------------------------------------------------------------------------------------------


def _percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), q in [0, 100]."""
    v = sorted(values)
    if len(v) == 1:
        return v[0]
    pos = (len(v) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def _median(values: Sequence[float]) -> float:
    return _percentile(values, 50)


@dataclass
class Results:
    records: list[dict] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (case, provider, reason)
    errors: list[tuple[str, str, str]] = field(default_factory=list)  # (case, provider, error)


class Progress:
    """One line per finished measurement on ``stream``: count, elapsed time and ETA (weighted by
    each unit's expected cost)."""

    def __init__(self, weights: Sequence[float], stream: TextIO | None) -> None:
        self.weights = list(weights)
        self.total = sum(self.weights) or 1.0
        self.done = 0.0
        self.count = 0
        self.stream = stream
        self.start = time.perf_counter()

    def write(self, msg: str) -> None:
        if self.stream is not None:
            print(msg, file=self.stream, flush=True)

    def step(self, label: str, seconds: float) -> None:
        self.done += self.weights[self.count]
        self.count += 1
        elapsed = time.perf_counter() - self.start
        remaining = elapsed * (self.total - self.done) / self.done if self.done else 0.0
        width = len(str(len(self.weights)))
        self.write(
            f"[{self.count:>{width}}/{len(self.weights)}] {label:<44} {seconds:6.1f}s   "
            f"elapsed {_clock(elapsed)}  ETA {_clock(remaining)}"
        )


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def _mode_weight(mode: str) -> float:
    return 3.0 if mode == TRAIN else 1.0


def _requests_for(layer: Layer, backends: Sequence[str] | None) -> list[str]:
    if backends is None:
        return ["auto"]  # "ref" is added when auto picks another backend
    return list(dict.fromkeys(backends))


def run_cases(
    cases: Sequence[tuple[Layer, Case]],
    setting: Setting,
    modes: Sequence[str],
    backends: Sequence[str] | None,
    repeats: int,
    warmup: int,
    common: dict | None = None,
    log: TextIO | None | str = "stderr",
) -> Results:
    """Measure every case in every mode; ``backends=None`` means "auto, plus ref when auto runs
    another backend". ``common`` columns are added to every record. Progress and skip reasons go
    to ``log`` (the current ``sys.stderr`` by default; None: silent)."""
    if log == "stderr":
        log = sys.stderr
    results = Results()
    # costs are comparable within a layer only (units differ: MACs, points, images), so each
    # layer's largest case weighs 1
    largest = {}
    for layer, c in cases:
        largest[layer.name] = max(largest.get(layer.name, 0), c.cost) or 1
    progress = Progress([c.cost / largest[layer.name] * _mode_weight(m)
                         for layer, c in cases for m in modes], log)
    reported: set[tuple[str, str]] = set()
    for layer, case in cases:
        gc.collect()
        workloads: dict[str, tuple[Workload, str]] = {}  # provider -> (workload, backend that ran)
        requests = [BASELINE] + _requests_for(layer, backends)
        i = 0
        while i < len(requests):
            request = requests[i]
            i += 1
            name = provider_name(layer, request)
            if request not in (BASELINE, "auto") and request not in layer.backends:
                reason = f"backend {request!r} is not implemented for {layer.name}"
                results.skipped.append((case.label, name, reason))
                if (name, reason) not in reported:
                    reported.add((name, reason))
                    progress.write(f"skip {name} on {case.label}: {reason}")
                continue
            try:
                torch.manual_seed(0)  # same inputs for every provider
                w = case.build(request, setting)
                backend = first_call(w)
            except BackendError as e:
                reason = str(e)
                results.skipped.append((case.label, name, reason))
                if (name, reason) not in reported:
                    reported.add((name, reason))
                    progress.write(f"skip {name} on {case.label}: {reason}")
                continue
            except Exception as e:  # noqa: BLE001 - report and go on with the other providers
                if request == BASELINE:
                    raise
                results.errors.append((case.label, name, f"{type(e).__name__}: {e}"))
                progress.write(f"ERROR {name} on {case.label}: {type(e).__name__}: {e}")
                continue
            workloads[name] = (w, backend)
            if backends is None and request == "auto" and backend != "ref":
                requests.append("ref")  # the reference path next to the kernel
        baseline = layer.baseline
        for mode in modes:
            t0 = time.perf_counter()
            names = list(workloads)
            steps = [make_step(workloads[n][0], mode) for n in names]
            times, peaks = measure(steps, repeats, warmup, setting.device, memory=mode == TRAIN)
            base_times = times[names.index(baseline)]
            for name, ts, peak in zip(names, times, peaks, strict=True):
                w, backend = workloads[name]
                ratios = [b / t for b, t in zip(base_times, ts, strict=True)]
                median_s = _median(ts)
                results.records.append({
                    "layer": layer.name,
                    "case": case.name,
                    "shape": case.shape,
                    "provider": name,
                    "backend": backend,
                    "mode": mode,
                    "dtype": str(setting.dtype).removeprefix("torch."),
                    "device": setting.device.type,
                    "tokens": w.tokens,
                    "median_ms": 1e3 * median_s,
                    "p20_ms": 1e3 * _percentile(ts, 20),
                    "p80_ms": 1e3 * _percentile(ts, 80),
                    "gflops": w.flops[mode] / median_s / 1e9 if mode in w.flops else None,
                    "speedup_vs_baseline": _median(ratios),
                    "peak_memory_mb": None if peak is None else peak / 2**20,
                    "repeats": repeats,
                    **(common or {}),
                })
            progress.step(f"{case.label} {mode}", time.perf_counter() - t0)
        del workloads
    return results
