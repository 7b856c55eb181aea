import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # small shapes gain nothing from a second thread, which on a shared machine only waits
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
