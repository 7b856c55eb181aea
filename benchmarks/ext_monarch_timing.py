"""Time the compiled Monarch kernels (effnn._C) against a dense nn.Linear on the CPU.

Standalone (no pytest). For each case it interleaves repetitions of the Monarch extension and of
``torch.nn.Linear(n, n, bias=False)`` in the same process and reports the median of the
per-repetition time ratios (dense / Monarch), which is robust to other load on the machine.

    python benchmarks/ext_monarch_timing.py                       # the three issue shapes
    python benchmarks/ext_monarch_timing.py --case 4096:64 --reps 5 --tokens 4096
    python benchmarks/ext_monarch_timing.py --jit                 # build csrc/ on the fly

"fwd+bwd" is forward + backward of ``y.sum()`` with x.requires_grad (dx, dw1, dw2 for Monarch;
dx, dW for dense): the Monarch forward saves the middle activation (save_mid=True, as fly does;
"mid MiB" is its size, the extra activation memory of a training step) and the backward reads it.
"fwd" is the forward alone under ``torch.no_grad()`` (save_mid=False: nothing saved).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_ext(jit: bool):
    if not jit:
        try:
            from effnn import _C  # noqa: PLC0415

            return _C
        except ImportError as e:
            sys.exit(f"effnn._C is not built ({e}); build it with "
                     "`EFFNN_BUILD_EXT=1 pip install --no-build-isolation --no-deps -e .` "
                     "or pass --jit")
    from torch.utils.cpp_extension import load  # noqa: PLC0415

    return load(
        "effnn_C_jit",
        [os.path.join(REPO, "csrc", "monarch_cpu.cpp")],
        extra_cflags=["-O3", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
    )


def make_fn(ext):
    class _Monarch(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w1, w2, out_features, save_mid):
            y, mid_t = ext.monarch_forward(x, w1, w2, None, out_features, save_mid)
            ctx.save_for_backward(x, mid_t, w1, w2)
            return y

        @staticmethod
        def backward(ctx, g):
            x, mid_t, w1, w2 = ctx.saved_tensors
            dx, dw1, dw2 = ext.monarch_backward(
                g.contiguous(), x, mid_t, w1, w2, ctx.needs_input_grad[0]
            )
            return (dx if ctx.needs_input_grad[0] else None), dw1, dw2, None, None

    def fn(x, w1, w2, out_features):
        # training keeps the middle activation for the backward; inference (no_grad) does not
        return _Monarch.apply(x, w1, w2, out_features, torch.is_grad_enabled())

    return fn


def monarch_weights(n: int, nb: int):
    blk = math.ceil(n / nb)
    w1 = (torch.randn(nb, blk, blk) / math.sqrt(blk)).requires_grad_()
    w2 = (torch.randn(nb, blk, blk) / math.sqrt(blk)).requires_grad_()
    return w1, w2


def timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def bench_case(fn, n: int, nb: int, tokens: int, reps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    x = torch.randn(tokens, n).requires_grad_()
    w1, w2 = monarch_weights(n, nb)
    dense = torch.nn.Linear(n, n, bias=False)

    def m_train():
        x.grad = w1.grad = w2.grad = None
        fn(x, w1, w2, n).sum().backward()

    def d_train():
        x.grad = dense.weight.grad = None
        dense(x).sum().backward()

    def m_fwd():
        with torch.no_grad():
            fn(x, w1, w2, n)

    def d_fwd():
        with torch.no_grad():
            dense(x)

    for _ in range(warmup):
        m_train(), d_train(), m_fwd(), d_fwd()
    res = {"train": ([], []), "fwd": ([], [])}
    for i in range(reps):
        # alternate the order so that neither side always runs first
        for kind, mf, df in (("train", m_train, d_train), ("fwd", m_fwd, d_fwd)):
            if i % 2:
                tm, td = timed(mf), timed(df)
            else:
                td, tm = timed(df), timed(mf)
            res[kind][0].append(tm)
            res[kind][1].append(td)
    out = {"n": n, "nb": nb}
    flop_ratio = (n * n) / (2 * nb * math.ceil(n / nb) ** 2)
    out["flop_ratio"] = flop_ratio
    out["mid_mib"] = tokens * w1.shape[0] * w1.shape[1] * x.element_size() / 2**20
    for kind, (tm, td) in res.items():
        out[kind] = {
            "monarch_ms": 1e3 * statistics.median(tm),
            "dense_ms": 1e3 * statistics.median(td),
            "speedup": statistics.median(d / m for d, m in zip(td, tm, strict=True)),
            "speedup_min": min(d / m for d, m in zip(td, tm, strict=True)),
            "speedup_max": max(d / m for d, m in zip(td, tm, strict=True)),
        }
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--case", action="append", metavar="N:NBLOCKS",
                    help="square case n:nblocks (repeatable); default 4096:64 4096:4 1024:32")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--jit", action="store_true", help="JIT-build csrc/monarch_cpu.cpp instead "
                    "of importing the installed effnn._C")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = args.case or ["4096:64", "4096:4", "1024:32"]
    fn = make_fn(load_ext(args.jit))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, tokens {args.tokens}, "
          f"reps {args.reps} (median of per-rep ratios, [min, max])", flush=True)
    hdr = (f"{'n':>5} {'nb':>4} {'FLOPx':>6} {'mid MiB':>7} | {'fwd+bwd ms M/D':>17} "
           f"{'speedup':>21} | {'fwd ms M/D':>15} {'speedup':>21}")
    print(hdr)
    print("-" * len(hdr))
    for c in cases:
        n, nb = (int(v) for v in c.split(":"))
        r = bench_case(fn, n, nb, args.tokens, args.reps, args.warmup)
        tr, fw = r["train"], r["fwd"]
        print(f"{n:>5} {nb:>4} {r['flop_ratio']:>5.0f}x {r['mid_mib']:>7.1f} | "
              f"{tr['monarch_ms']:>7.1f} / {tr['dense_ms']:>7.1f} "
              f"{tr['speedup']:>6.2f}x [{tr['speedup_min']:.2f}, {tr['speedup_max']:.2f}] | "
              f"{fw['monarch_ms']:>6.1f} / {fw['dense_ms']:>6.1f} "
              f"{fw['speedup']:>6.2f}x [{fw['speedup_min']:.2f}, {fw['speedup_max']:.2f}]",
              flush=True)


if __name__ == "__main__":
    main()
