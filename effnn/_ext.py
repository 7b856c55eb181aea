"""Finds the optional compiled extension ``effnn._C`` (C++ CPU kernels).

It is built only on request (``EFFNN_BUILD_EXT=1 pip install --no-build-isolation -e .``); its
absence is normal and only reported, never raised, until a user forces ``backend="ext"``.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

import torch

BUILD_HINT = (
    "build it from a source checkout with "
    "`EFFNN_BUILD_EXT=1 pip install --no-build-isolation --no-deps -e .`"
)


@functools.cache
def _load() -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module("effnn._C"), None
    except ImportError as e:
        if getattr(e, "name", None) == "effnn._C":
            return None, f"the compiled extension effnn._C is not built ({BUILD_HINT})"
        return None, f"the compiled extension effnn._C failed to load: {e} ({BUILD_HINT})"


def load() -> ModuleType | None:
    """The extension module, or None when it is not available."""
    return _load()[0]


@torch.compiler.assume_constant_result  # probed once; torch.compile must not trace the import
def unavailable_reason() -> str | None:
    """Why the extension cannot be used, or None when it can."""
    return _load()[1]
