import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test of tests/train on one thread (see tests/conftest.py)."""
