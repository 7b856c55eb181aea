"""Finds the optional compiled extension ``effnn._C`` (C++ CPU kernels).

It is built only on request (``EFFNN_BUILD_EXT=1 pip install --no-build-isolation -e .``); its
absence is normal and only reported, never raised, until a user forces ``backend="ext"``.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

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


def constant_under_compile(fn):
    """Mark a probe whose result never changes so torch.compile calls it instead of tracing it.

    This is what ``torch.compiler.assume_constant_result`` does, without its import of
    torch._dynamo (and triton), which would make ``import effnn`` slow.
    """
    fn._dynamo_marked_constant = True
    return fn


@constant_under_compile
def unavailable_reason() -> str | None:
    """Why the extension cannot be used, or None when it can."""
    return _load()[1]
