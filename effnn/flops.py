"""FLOP counting for effnn ops, so users' counters see their real cost.

Each op registers one multiply-add count (a function of its input shapes) with
:func:`register_macs`. It is then counted by ``torch.utils.flop_counter.FlopCounterMode`` (which counts
2 FLOPs per multiply-add, as for ``aten.mm``) and, through :func:`fvcore_handles`, by fvcore
(which counts 1 per multiply-add)::

    from fvcore.nn import FlopCountAnalysis
    FlopCountAnalysis(model, inputs).set_op_handle(**effnn.flops.fvcore_handles()).total()
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import register_flop_formula

# op name ("effnn::monarch_linear") -> macs(*input_shapes) -> int
_MACS: dict[str, Callable[..., int]] = {}


def register_macs(op: torch._ops.OpOverloadPacket, macs: Callable[..., int]) -> None:
    """Count ``op`` at ``macs(*shapes)`` multiply-adds, where ``shapes`` are the shapes of its
    tensor arguments in order (None for an absent optional tensor, the value for a non-tensor)."""

    def formula(*args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return 2 * macs(*args)

    register_flop_formula(op)(formula)
    _MACS[op._qualified_op_name] = macs


def _fvcore_handle(macs: Callable[..., int]) -> Callable[[list, list], int]:
    def handle(inputs: list, outputs: list) -> int:
        shapes = []
        for value in inputs:
            sizes = value.type().sizes() if value.isCompleteTensor() else None
            shapes.append(tuple(sizes) if sizes is not None else value.toIValue())
        return macs(*shapes)

    return handle


def _sdpa_fvcore_handle(inputs: list, outputs: list) -> int:
    # fvcore has no handle for this op; count both products, as FlopCounterMode does.
    q, k, v = (inputs[i].type().sizes() for i in range(3))
    *batch, s_q, d = q
    return math.prod(batch) * s_q * k[-2] * (d + v[-1])


def fvcore_handles() -> dict[str, Callable[[list, list], int]]:
    """``{op name: handle}`` for ``fvcore.nn.FlopCountAnalysis.set_op_handle(**handles)``: effnn's
    ops, and ``aten::scaled_dot_product_attention`` (which fvcore does not count by itself)."""
    handles = {name: _fvcore_handle(macs) for name, macs in _MACS.items()}
    handles["aten::scaled_dot_product_attention"] = _sdpa_fvcore_handle
    return handles
