"""pytest-benchmark suite: ``SparseAnchorGenerator`` (compresses P3/P4 only under the probed
patches) against the official-style dense P3/P4 compression, fp32, one image, on the CPU.

    pytest benchmarks/bench_asag.py                  # 800x1333 and 512x512, ~1 min
    pytest benchmarks/bench_asag.py --benchmark-only # timings only

Each benchmark group holds both providers for one image size and mode, so pytest-benchmark's
table compares them; the cases and timed steps are those of ``effnn bench --layers asag``
(effnn/bench/asag.py: heads biased so that 5 patches are probed on P4 and 5 on P3). Forward is
the meaningful mode; forward+backward backpropagates into the patches' raw predictions of the
same eval-mode call. ``test_both_providers_give_the_same_anchors`` checks that the baseline
differs only in how much it compresses.
"""

from __future__ import annotations

import pytest
import torch

from effnn.bench import BASELINE, FORWARD, TRAIN, Setting, get_layer
from effnn.bench.runner import first_call, make_step

ASAG = get_layer("asag")
SETTING = Setting(device=torch.device("cpu"), dtype=torch.float32)


def _workload(provider: str, shape: str):
    torch.manual_seed(0)  # the same maps and weights for both providers, as effnn bench
    return ASAG.parse(shape).build(provider, SETTING)


@pytest.mark.parametrize("mode", [FORWARD, TRAIN], ids=["forward", "train"])
@pytest.mark.parametrize("shape", list(ASAG.defaults))
@pytest.mark.parametrize("provider", [BASELINE, "auto"], ids=["dense-compression", "effnn"])
def test_sparse_vs_dense_compression(benchmark, provider, shape, mode):
    workload = _workload(provider, shape)
    backend = first_call(workload)
    step = make_step(workload, mode)
    benchmark.group = f"asag {shape} {mode}"
    benchmark.extra_info.update(backend=backend, gflop=workload.flops[mode] / 1e9)
    benchmark.pedantic(step.run, setup=step.zero, rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("shape", list(ASAG.defaults))
def test_both_providers_give_the_same_anchors(shape):
    outs = []
    for provider in (BASELINE, "auto"):
        w = _workload(provider, shape)
        with torch.no_grad():
            outs.append(w.fn.generator(list(w.inputs[:3]), w.inputs[3]))
    dense, sparse = outs
    assert {p.level: len(p.batch_idx) for p in sparse.patches} == {6: 1, 5: 4, 4: 5, 3: 5}
    assert torch.equal(dense.valid, sparse.valid) and torch.equal(dense.levels, sparse.levels)
    torch.testing.assert_close(dense.boxes, sparse.boxes, rtol=0, atol=1e-3)
