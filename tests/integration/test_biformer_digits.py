"""A shortened run of examples/biformer_digits.py: a reduced BiFormer learns the digits."""

from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "biformer_digits.py"


@pytest.fixture
def example():
    pytest.importorskip("sklearn")
    spec = importlib.util.spec_from_file_location("biformer_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_shortened_run_learns(example):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # much faster than two threads on a shared 2-core machine
    try:
        result = example.train(example.Config(max_steps=30), seed=0)
    finally:
        torch.set_num_threads(threads)
    losses = result["losses"]
    assert result["steps"] == len(losses) == 30
    first, last = statistics.mean(losses[:5]), statistics.mean(losses[-5:])
    assert first > 2.0  # about ln(10) at the start
    assert last < 0.8 * first, (first, last)
    assert result["test_accuracy"] > 0.2  # chance is 0.1; about 0.39 here
