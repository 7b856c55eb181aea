#!/usr/bin/env bash
# One device check on a CUDA machine (run from the repository root): the Triton kernel tests on CUDA
# without the interpreter, then kernel timings against the PyTorch baselines. Meant for the lent H200
# (no network there: its python3 already has torch, triton, pytest, hypothesis, einops, numpy).
# Writes its logs and CSV/Markdown tables under ${OUT:-./gpu-check}; record the table in docs/benchmarks.md.
set -uo pipefail
out="${OUT:-./gpu-check}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 - <<'PY'
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "device", torch.cuda.get_device_name())
PY
python3 -m effnn.info
echo "== Triton kernel tests on CUDA (tests/kernels includes test_routing_attention_triton.py and test_radial_window_triton.py)"
python3 -m pytest -q -p no:cacheprovider tests/kernels tests/ops 2>&1 | tee "$out/tests.log" | tail -n 25
echo "== timings (effnn vs the dense baseline and the reference path)"
for dtype in bfloat16 float32; do
  python3 -m effnn.bench --device cuda --dtype "$dtype" --backends triton,ref --repeats 20 --warmup 3 \
    --out "$out" --no-plot 2>&1 | tee "$out/bench-$dtype.log"
done
echo "== routed attention (BiFormer level 2): Triton kernel vs the reference op, BiFormer-T stages, batch 8"
python3 - "$out" <<'PY' 2>&1 | tee "$out/routed_attention.log"
# Interleaved repetitions, median of per-repetition ratios (ref time / triton time), peak memory.
import csv, statistics, sys, torch
from effnn.ops.routing_attention import routed_attention
out_dir = sys.argv[1]
STAGES = {"stage1": (64, 64, 2, 1), "stage2": (16, 128, 4, 4), "stage3": (4, 256, 8, 16)}  # T, C, heads, topk
N, P = 8, 49

def step(args, kw, backend, train):
    q, k, v = (t.detach().requires_grad_(train) for t in args[:3])
    y = routed_attention(q, k, v, *args[3:], **kw, backend=backend)
    if train:
        y.backward(torch.ones_like(y))

def timed(fn):
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record(); fn(); b.record(); torch.cuda.synchronize()
    return a.elapsed_time(b), torch.cuda.max_memory_allocated()

rows = []
for dtype in (torch.bfloat16, torch.float32):
    for stage, (T, C, heads, topk) in STAGES.items():
        for soft in (False, True):
            g = torch.Generator(device="cuda").manual_seed(0)
            q, k, v = (torch.randn(N, P, T, C, device="cuda", dtype=dtype, generator=g) for _ in range(3))
            r_idx = torch.rand(N, P, P, device="cuda", generator=g).argsort(-1)[..., :topk]
            w = torch.rand(N, P, topk, device="cuda", generator=g).softmax(-1) if soft else None
            args, kw = (q, k, v, r_idx, w), dict(num_heads=heads, scale=C ** -0.5)
            for train in (False, True):
                for b in ("triton", "ref"):
                    for _ in range(3):
                        step(args, kw, b, train)
                ratios, ms, mem = [], {"triton": [], "ref": []}, {}
                for _ in range(20):
                    for b in ("triton", "ref"):
                        t, mem[b] = timed(lambda: step(args, kw, b, train))
                        ms[b].append(t)
                    ratios.append(ms["ref"][-1] / ms["triton"][-1])
                row = dict(dtype=str(dtype).split(".")[-1], stage=stage, soft=soft,
                           mode="fwd+bwd" if train else "fwd",
                           triton_ms=round(statistics.median(ms["triton"]), 4),
                           ref_ms=round(statistics.median(ms["ref"]), 4), speedup_median=round(statistics.median(ratios), 3),
                           triton_peak_mib=round(mem["triton"] / 2**20, 1), ref_peak_mib=round(mem["ref"] / 2**20, 1))
                rows.append(row)
                print(row, flush=True)
with open(f"{out_dir}/routed_attention.csv", "w", newline="") as f:
    wr = csv.DictWriter(f, fieldnames=list(rows[0]))
    wr.writeheader(); wr.writerows(rows)
PY
echo "== window attention CUDA kernel (csrc/window_attention_cuda.cu): build effnn._C with CUDA, compare with the reference"
if EFFNN_BUILD_EXT=1 EFFNN_BUILD_CUDA=1 python3 setup.py -q build_ext --inplace > "$out/build_ext_cuda.log" 2>&1; then
  python3 -m pytest -q -p no:cacheprovider tests/kernels/test_window_attention_cuda.py 2>&1 | tee "$out/window_attention_cuda.log" | tail -n 25
else
  echo "effnn._C did not build with CUDA (nvcc missing?):"; tail -n 30 "$out/build_ext_cuda.log"
fi
