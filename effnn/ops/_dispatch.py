"""Backend selection shared by every effnn op.

Each op offers up to three implementations: ``ref`` (plain PyTorch, the specification, any device),
``triton`` (fused kernels for CUDA tensors; on CPU tensors only under ``TRITON_INTERPRET=1``, which is
how the tests check kernels here) and ``ext`` (the optional compiled extension ``effnn._C``).
``backend="auto"`` takes the first that can serve the input; a forced backend that cannot serve it
raises :class:`BackendError` with every reason, in the manner of xformers' ``not_supported_reasons``.
The choice depends on the tensors' device, never on what happens to be importable.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable

import torch

from effnn import _ext
from effnn._ext import constant_under_compile

BACKENDS = ("auto", "ref", "triton", "ext")

# Order in which "auto" tries the backends, by device type. The Triton interpreter is a testing
# tool, so "auto" never picks Triton for CPU tensors.
_AUTO_ORDER = {"cuda": ("triton", "ref"), "cpu": ("ext", "ref")}


class BackendError(NotImplementedError):
    """A forced backend cannot serve the given input; the message lists why."""


@constant_under_compile  # probed once; torch.compile must not trace the import
@functools.cache
def _triton_import_error() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (it ships with PyTorch's Linux CUDA wheels)"
    return None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_device_reasons(device: torch.device) -> list[str]:
    """Why Triton cannot run on ``device`` (empty when it can)."""
    reasons = []
    missing = _triton_import_error()
    if missing:
        reasons.append(missing)
    if device.type == "cpu":
        if not triton_interpret():
            reasons.append(
                "Triton kernels run on CUDA tensors; CPU tensors only under TRITON_INTERPRET=1 "
                "(the interpreter, for tests)"
            )
    elif device.type != "cuda":
        reasons.append(f"Triton kernels run on CUDA tensors, got device {device.type!r}")
    return reasons


def ext_device_reasons(device: torch.device) -> list[str]:
    """Why the compiled extension cannot run on ``device`` (empty when it can)."""
    reasons = []
    missing = _ext.unavailable_reason()
    if missing:
        reasons.append(missing)
    if device.type != "cpu":
        reasons.append(f"effnn._C has CPU kernels only, got device {device.type!r}")
    return reasons


def ext_cuda_reasons(op: str) -> list[str]:
    """Why the compiled extension has no CUDA kernel for ``op`` ("effnn_ext::name"; empty when it
    has one: effnn._C built with EFFNN_BUILD_CUDA=1)."""
    missing = _ext.unavailable_reason()
    if missing:
        return [missing]
    if not _ext_has_cuda_kernel(op):
        return [
            "effnn._C was built without CUDA kernels (rebuild it from a source checkout with "
            "`EFFNN_BUILD_EXT=1 EFFNN_BUILD_CUDA=1 pip install --no-build-isolation --no-deps -e .`)"
        ]
    return []


@constant_under_compile  # probed once (after effnn._C is loaded); torch.compile must not trace it
@functools.cache
def _ext_has_cuda_kernel(op: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")
    except RuntimeError:  # an older build without this op
        return False


def select_backend(
    op: str,
    backend: str,
    device: torch.device,
    reasons: dict[str, Callable[[], list[str]]],
) -> str:
    """Return the backend that serves an input on ``device``.

    ``reasons[name]()`` lists why backend ``name`` cannot serve the input (empty: it can). Backends
    missing from ``reasons`` are not implemented for this op.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        if backend not in reasons:
            raise BackendError(f"{op}: backend={backend!r} is not implemented for this op")
        why = reasons[backend]()
        if why:
            raise BackendError(f"{op}: backend={backend!r} cannot serve this input: " + "; ".join(why))
        return backend
    for name in _AUTO_ORDER.get(device.type, ("ref",)):
        if name in reasons and not reasons[name]():
            return name
    return "ref"
