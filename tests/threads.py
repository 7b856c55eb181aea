"""One intra-op thread: small shapes gain nothing from a second one, which on a shared 2-core
machine only spin-waits (several times slower)."""

from contextlib import contextmanager

import torch


@contextmanager
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
