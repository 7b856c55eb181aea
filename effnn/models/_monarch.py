"""Shared helper: apply a named Monarch configuration to a reference model with ``swap_linear``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from effnn.convert import MonarchConfig, swap_linear


def apply_monarch(
    model: nn.Module,
    monarch: str | Sequence[str] | bool | None,
    presets: Mapping[str, Sequence[str]],
    default: str,
    nblocks: int,
    init: str,
    factory: str,
) -> nn.Module:
    """Swap the linears named by ``monarch`` for ``MonarchLinear(nblocks)`` in place.

    ``monarch`` is None/False (dense), True (the ``default`` preset), a preset name, or a list of
    module names / name suffixes passed to ``swap_linear(target_modules=...)`` as they are.
    """
    if monarch is None or monarch is False:
        return model
    if monarch is True:
        monarch = default
    if isinstance(monarch, str):
        if monarch not in presets:
            raise ValueError(
                f"{factory}: monarch must be None, True, one of {sorted(presets)} or a list of "
                f"module names, got {monarch!r}"
            )
        targets = list(presets[monarch])
    elif isinstance(monarch, Sequence) and all(isinstance(n, str) for n in monarch):
        targets = list(monarch)
    else:
        raise TypeError(
            f"{factory}: monarch must be None, a bool, a preset name or a list of module names, "
            f"got {monarch!r}"
        )
    return swap_linear(model, MonarchConfig(nblocks=nblocks, init=init), target_modules=targets)
