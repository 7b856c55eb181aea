"""pytest-benchmark suite: the dense FFN gathered from an ``effnn.MoE`` (OneS) against the MoE
itself, fp32, on the CPU.

    pytest benchmarks/bench_moe.py                  # 512 tokens, ~30 s
    EFFNN_BENCH_FULL=1 pytest benchmarks/bench_moe.py   # effnn bench's 4096 tokens
    pytest benchmarks/bench_moe.py --benchmark-only # timings only

Each benchmark group holds the MoE and the gathered FFN for one shape and mode, so
pytest-benchmark's table compares them; the cases and timed steps are those of ``effnn bench``
(effnn/bench/moe.py).
"""

from __future__ import annotations

import os

import pytest
import torch

from effnn.bench import BASELINE, FORWARD, TRAIN, Setting, get_layer
from effnn.bench.runner import first_call, make_step

FULL = os.environ.get("EFFNN_BENCH_FULL", "0") == "1"
MOE = get_layer("moe")
TOKENS = 4096 if FULL else 512
SETTING = Setting(device=torch.device("cpu"), dtype=torch.float32, tokens=TOKENS)


@pytest.mark.parametrize("mode", [FORWARD, TRAIN], ids=["forward", "train"])
@pytest.mark.parametrize("shape", list(MOE.defaults))
@pytest.mark.parametrize("provider", [BASELINE, "auto"], ids=["moe", "gathered"])
def test_gathered_ffn_vs_moe(benchmark, provider, shape, mode):
    case = MOE.parse(shape)
    torch.manual_seed(0)
    workload = case.build(provider, SETTING)
    backend = first_call(workload)
    step = make_step(workload, mode)
    benchmark.group = f"moe {case.name} T={TOKENS} {mode}"
    benchmark.extra_info.update(backend=backend, gflop=workload.flops[mode] / 1e9)
    benchmark.pedantic(step.run, setup=step.zero, rounds=5, warmup_rounds=1)
