"""Command line of ``effnn bench`` / ``python -m effnn.bench``."""

from __future__ import annotations

import argparse
import datetime as _dt
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from effnn.bench import registry, report, runner
from effnn.bench.registry import FORWARD, TRAIN, Case, Layer, Setting

DESCRIPTION = """\
Microbenchmarks of every registered effnn layer against its dense baseline (and against the
reference path where another backend serves), forward and forward+backward, measured in the same
run: providers alternate within each repetition and the speedup is the median of the per-repetition
ratios. Prints a table, shows progress on stderr, and writes CSV, Markdown and a PNG plot to --out.
"""

EPILOG = """\
shapes (--shapes, repeatable or comma-separated; prefix LAYER: when several layers run):
{formats}
examples:
  effnn bench                                    every layer, default shapes
  effnn bench --quick                            smaller token counts, fewer repeats (< 2 min)
  effnn bench --layers monarch --shapes 4096x4096x64,1024x1024x32 --tokens 2048
  effnn bench --backends ref,ext --modes train   force backends (those that cannot run are skipped)
  effnn bench --list                             registered layers and their default shapes

columns: median_ms, p20_ms, p80_ms over the repetitions; gflops = model FLOPs (2 per multiply-add;
forward+backward = 3x forward, recomputation not counted) / median time; speedup_vs_baseline =
median over repetitions of baseline time / provider time; peak_memory_mb (forward+backward) = peak
memory of tensors allocated during one training step above the level at its start (CUDA:
max_memory_allocated; CPU: allocator events recorded by torch.profiler).
"""

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
MODE_NAMES = {"forward": FORWARD, "fwd": FORWARD, "train": TRAIN, "forward+backward": TRAIN,
              "fwd+bwd": TRAIN}

DEFAULT_REPEATS, DEFAULT_WARMUP = 5, 1
QUICK_REPEATS, QUICK_WARMUP = 3, 1


def _csv(values: Sequence[str] | None) -> list[str] | None:
    if values is None:
        return None
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options of ``effnn bench`` to ``parser`` (shared by ``effnn bench`` and
    ``python -m effnn.bench``)."""
    formats = "\n".join(f"  {layer.name:<10} {layer.shape_format}; default "
                        f"{','.join(layer.defaults)}" for layer in registry.layers().values())
    parser.description = DESCRIPTION
    parser.epilog = EPILOG.format(formats=formats)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--layers", action="append", metavar="NAME[,NAME]",
                        help=f"layers to run (default: all: {','.join(registry.layers())})")
    parser.add_argument("--shapes", action="append", metavar="[LAYER:]SPEC[,SPEC]",
                        help="shapes instead of the defaults (formats below)")
    parser.add_argument("--tokens", type=_positive, metavar="N",
                        help="tokens per call (default: each case's own, 4096 for monarch; "
                             "fewer with --quick)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), metavar="DTYPE",
                        help="float32 (default), bfloat16 or float16")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto (default): cuda when available, else cpu")
    parser.add_argument("--repeats", type=_positive, metavar="N",
                        help=f"timed repetitions per provider (default {DEFAULT_REPEATS}, "
                             f"--quick {QUICK_REPEATS})")
    parser.add_argument("--warmup", type=_non_negative, metavar="N",
                        help=f"untimed calls per provider before timing (default {DEFAULT_WARMUP}; "
                             "at least one always runs)")
    parser.add_argument("--modes", action="append", metavar="MODE[,MODE]",
                        help="forward and/or train (forward+backward); default both")
    parser.add_argument("--backends", action="append", metavar="NAME[,NAME]",
                        help="effnn backends to run: auto, ref, triton, ext (default: auto, plus "
                             "ref when auto picks another backend); unusable ones are skipped "
                             "with the reason")
    parser.add_argument("--threads", type=_positive, metavar="N",
                        help="torch.set_num_threads(N) (default: PyTorch's choice)")
    parser.add_argument("--out", default="bench-results", metavar="DIR",
                        help="folder for the CSV, Markdown and PNG files (default ./bench-results)")
    parser.add_argument("--quick", action="store_true",
                        help="smaller token counts and fewer repeats: a smoke run")
    parser.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    parser.add_argument("--list", action="store_true",
                        help="list the registered layers and their default shapes, and exit")
    return parser


def build_parser(prog: str = "python -m effnn.bench") -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog=prog))


def _select_cases(args, parser) -> list[tuple[Layer, Case]]:
    known = registry.layers()
    names = _csv(args.layers)
    shapes = _csv(args.shapes) or []
    prefixed: dict[str, list[str]] = {}
    plain: list[str] = []
    for spec in shapes:
        layer, sep, rest = spec.partition(":")
        if sep:
            prefixed.setdefault(layer.strip(), []).append(rest.strip())
        else:
            plain.append(spec)
    for name in list(names or []) + list(prefixed):
        if name not in known:
            parser.error(f"unknown layer {name!r}; registered: {', '.join(sorted(known))}")
    if names is None:
        if prefixed and not plain:
            names = list(prefixed)
        else:
            names = list(known)
            if plain and len(names) > 1:
                parser.error("--shapes without a LAYER: prefix needs --layers when several layers "
                             f"are registered ({', '.join(names)})")
    for name in prefixed:
        if name not in names:
            parser.error(f"--shapes names layer {name!r}, which --layers does not select")
    selected = []
    for name in dict.fromkeys(names):
        layer = known[name]
        specs = prefixed.get(name, []) + plain
        try:
            cases = layer.cases(specs or None, quick=args.quick)
        except ValueError as e:
            parser.error(f"--shapes for {name}: {e}")
        selected += [(layer, case) for case in cases]
    return selected


def _list_layers() -> None:
    for layer in registry.layers().values():
        print(f"{layer.name}: {layer.title}")
        print(f"  baseline: {layer.baseline}; backends: auto, {', '.join(layer.backends)}")
        print(f"  shape format: {layer.shape_format}")
        for case in layer.cases():
            print(f"  default {case.name:<22} {case.shape}")
        if layer.quick is not None:
            print(f"  --quick shapes: {', '.join(layer.quick)}")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser, command: str) -> int:
    """Run ``effnn bench`` for parsed ``args``; returns the exit status."""
    if args.list:
        _list_layers()
        return 0
    cases = _select_cases(args, parser)
    modes = []
    for m in _csv(args.modes) or ["forward", "train"]:
        if m not in MODE_NAMES:
            parser.error(f"--modes: expected forward or train, got {m!r}")
        modes.append(MODE_NAMES[m])
    modes = list(dict.fromkeys(modes))
    backends = _csv(args.backends)
    for b in backends or []:
        if b not in registry.EFFNN_BACKENDS:
            parser.error(f"--backends: expected some of {', '.join(registry.EFFNN_BACKENDS)}, "
                         f"got {b!r}")
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (QUICK_REPEATS if args.quick else DEFAULT_REPEATS)
    warmup = args.warmup if args.warmup is not None else (QUICK_WARMUP if args.quick else DEFAULT_WARMUP)
    dtype = DTYPES[args.dtype]
    setting = Setting(device=device, dtype=dtype, tokens=args.tokens, quick=args.quick)

    import effnn

    now = _dt.datetime.now(_dt.timezone.utc)
    machine = report.machine_description(device)
    common = {
        "torch_version": torch.__version__,
        "effnn_version": effnn.__version__,
        "machine": machine,
        "threads": torch.get_num_threads(),
        "timestamp": now.isoformat(timespec="seconds"),
    }
    header = (f"effnn {effnn.__version__}, torch {torch.__version__}; {machine}; "
              f"{torch.get_num_threads()} threads; {device.type} {args.dtype}; "
              f"{repeats} repeats, {warmup} warm-up")
    print(f"effnn bench: {len(cases)} cases x {len(modes)} modes; {header}", file=sys.stderr,
          flush=True)
    start = time.perf_counter()
    results = runner.run_cases(cases, setting, modes, backends, repeats, warmup, common, sys.stderr)
    elapsed = time.perf_counter() - start

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"effnn-bench-{now.strftime('%Y%m%d-%H%M%S')}"
    title = f"`{command}` -- {header}; {now.strftime('%Y-%m-%d %H:%M UTC')}"
    print(header)
    print(f"command: {command}")
    print()
    print(report.format_table(results.records))
    print()
    for case, provider, reason in results.skipped:
        print(f"skipped {provider} on {case}: {reason}")
    for case, provider, error in results.errors:
        print(f"FAILED {provider} on {case}: {error}")
    written = [stem.with_suffix(".csv"), stem.with_suffix(".md")]
    report.write_csv(results.records, written[0])
    written[1].write_text(report.format_markdown(results.records, title))
    if not args.no_plot and results.records:
        why_not = report.write_plot(results.records, stem.with_suffix(".png"), title.replace("`", ""))
        if why_not:
            print(why_not)
        else:
            written.append(stem.with_suffix(".png"))
    print(f"finished in {elapsed:.0f}s; wrote {', '.join(str(p) for p in written)}")
    return 1 if results.errors else 0


def main(argv: Sequence[str] | None = None, prog: str = "python -m effnn.bench") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    return run(args, parser, shlex.join([*prog.split(), *argv]))
