"""Output of ``effnn bench``: the plain-text table, the CSV, a Markdown table and the PNG plot."""

from __future__ import annotations

import csv
import os
import platform
import textwrap
from collections.abc import Sequence
from pathlib import Path

import torch

COLUMNS = (
    "layer", "case", "shape", "provider", "backend", "mode", "dtype", "device", "tokens",
    "median_ms", "p20_ms", "p80_ms", "gflops", "speedup_vs_baseline", "peak_memory_mb", "repeats",
    "torch_version", "effnn_version", "machine", "threads", "timestamp",
)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_description(device: torch.device) -> str:
    """e.g. "AMD EPYC (2 logical CPUs), Linux x86_64" or the GPU's name on CUDA."""
    host = f"{cpu_model()} ({os.cpu_count()} logical CPUs), {platform.system()} {platform.machine()}"
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}; host {host}"
    return host


def _fmt(value, digits: int = 2) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    return str(value)


def _rows(records: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["case", "tokens", "mode", "provider", "backend", "median ms", "p20-p80 ms", "GFLOP/s",
              "vs baseline", "peak MB"]
    rows = []
    for r in records:
        rows.append([
            f"{r['layer']}:{r['case']}",
            str(r["tokens"]),
            r["mode"],
            r["provider"],
            r["backend"],
            _fmt(r["median_ms"], 1 if r["median_ms"] >= 10 else 3),
            f"{_fmt(r['p20_ms'], 1 if r['p20_ms'] >= 10 else 3)}-"
            f"{_fmt(r['p80_ms'], 1 if r['p80_ms'] >= 10 else 3)}",
            _fmt(r["gflops"], 1),
            f"{r['speedup_vs_baseline']:.2f}x",
            _fmt(r["peak_memory_mb"], 1 if (r["peak_memory_mb"] or 0) >= 10 else 3),
        ])
    return header, rows


def format_table(records: Sequence[dict]) -> str:
    """Plain-text table, one line per (case, mode, provider), a blank line between cases."""
    header, rows = _rows(records)
    numeric = {1, 5, 6, 7, 8, 9}
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    previous = None
    for r, cells in zip(records, rows, strict=True):
        key = (r["layer"], r["case"])
        if previous is not None and key != previous:
            out.append("")
        previous = key
        out.append(line(cells))
    return "\n".join(out)


def format_markdown(records: Sequence[dict], title: str = "") -> str:
    header, rows = _rows(records)
    out = [title, ""] if title else []
    out.append("| " + " | ".join(header) + " |")
    out.append("|" + "|".join("---:" if i >= 5 or i == 1 else "---" for i in range(len(header))) + "|")
    out += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(out) + "\n"


def write_csv(records: Sequence[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in records:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_plot(records: Sequence[dict], path: Path, title: str = "") -> str | None:
    """Bar chart of the speedup over the baseline per case, one panel per mode.

    Returns None when written, else why not (matplotlib missing).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return "matplotlib is not installed (pip install 'effnn[bench]'); no plot written"
    modes = list(dict.fromkeys(r["mode"] for r in records))
    cases = list(dict.fromkeys(f"{r['layer']}:{r['case']}" for r in records))
    # the baseline is the dashed line at 1x; bars for the effnn providers
    providers = list(dict.fromkeys(r["provider"] for r in records if r["provider"].startswith("effnn")))
    speed = {(f"{r['layer']}:{r['case']}", r["mode"], r["provider"]): float(r["speedup_vs_baseline"])
             for r in records}
    fig = Figure(figsize=(max(6.0, 1.6 * len(cases)) * len(modes), 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(modes), squeeze=False)[0]
    width = 0.8 / max(len(providers), 1)
    for ax, mode in zip(axes, modes, strict=True):
        for k, provider in enumerate(providers):
            xs, ys = [], []
            for c, case in enumerate(cases):
                if (case, mode, provider) in speed:
                    xs.append(c - 0.4 + width * (k + 0.5))
                    ys.append(speed[(case, mode, provider)])
            bars = ax.bar(xs, ys, width, label=provider)
            ax.bar_label(bars, labels=[f"{y:.2f}" for y in ys], fontsize=7, padding=1)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--", label="baseline (1x)")
        ax.set_xticks(range(len(cases)), cases, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("speedup vs baseline (x, higher is better)")
        ax.set_title(mode)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(textwrap.fill(title, 160), fontsize=8)
    fig.savefig(path, dpi=120)
    return None
