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
echo "== Triton kernel tests on CUDA"
python3 -m pytest -q -p no:cacheprovider tests/kernels tests/ops 2>&1 | tee "$out/tests.log" | tail -n 25
echo "== timings (effnn vs the dense baseline and the reference path)"
for dtype in bfloat16 float32; do
  python3 -m effnn.bench --device cuda --dtype "$dtype" --backends triton,ref --repeats 20 --warmup 3 \
    --out "$out" --no-plot 2>&1 | tee "$out/bench-$dtype.log"
done
