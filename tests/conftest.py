import os

# Triton kernels are tested on CPU tensors through the interpreter (there is no GPU in CI). This
# must be set before triton is imported; it only affects Triton launches.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.threads import single_thread  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)



@pytest.fixture
def one_thread():
    """The test on one thread (tests/threads.py); per module:
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    with single_thread():
        yield
