"""effnn: efficient layers from recent papers, exact to the paper, as drop-in PyTorch modules.

Importing effnn is cheap and safe: it never initialises CUDA, never compiles, and needs neither
triton nor the compiled extension (``python -m effnn.info`` reports what is available).
"""

from effnn.checkpoint import load, save
from effnn.convert import MonarchConfig, swap_linear
from effnn.nn import MonarchLinear
from effnn.ops._dispatch import BackendError

__version__ = "0.1.0"

__all__ = ["BackendError", "MonarchConfig", "MonarchLinear", "load", "save", "swap_linear"]
