"""A shortened run of examples/biformer_digits.py: a reduced BiFormer learns the digits."""

from __future__ import annotations

import statistics

import pytest

from tests.examples import load_example


@pytest.fixture
def example():
    pytest.importorskip("sklearn")
    return load_example("biformer_digits.py")


def test_shortened_run_learns(example, one_thread):
    result = example.train(example.Config(max_steps=30), seed=0)
    losses = result["losses"]
    assert result["steps"] == len(losses) == 30
    first, last = statistics.mean(losses[:5]), statistics.mean(losses[-5:])
    assert first > 2.0  # about ln(10) at the start
    assert last < 0.8 * first, (first, last)
    assert result["test_accuracy"] > 0.2  # chance is 0.1; about 0.39 here
