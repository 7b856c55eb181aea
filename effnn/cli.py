"""The ``effnn`` console script: ``effnn bench`` (microbenchmarks) and ``effnn info`` (versions
and which backends can run here)."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence


def build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    from effnn.bench import add_arguments

    parser = argparse.ArgumentParser(
        prog="effnn", description="effnn: efficient layers from recent papers."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    bench = sub.add_parser(
        "bench", help="benchmark the layers against their dense baselines (table, CSV, plot)"
    )
    add_arguments(bench)
    sub.add_parser("info", help="versions, and which backends can run here and why not")
    return parser, bench


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, bench_parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "info":
        from effnn.info import main as info_main

        info_main()
        return 0
    from effnn.bench import run

    return run(args, bench_parser, shlex.join(["effnn", *argv]))


if __name__ == "__main__":
    sys.exit(main())
