"""Shared helper: build a reference model and apply a named Monarch configuration with
``effnn.swap_linear``."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from effnn.convert import MonarchConfig, swap_linear


def _targets(
    monarch: str | Sequence[str] | bool | None,
    presets: Mapping[str, Sequence[str]],
    default: str,
    factory: str,
) -> list[str] | None:
    """The module names/suffixes to swap, or None for the dense model."""
    if monarch is None or monarch is False:
        return None
    if monarch is True:
        monarch = default
    if isinstance(monarch, str):
        if monarch not in presets:
            raise ValueError(
                f"{factory}: monarch must be None, True, one of {sorted(presets)} or a list of "
                f"module names, got {monarch!r}"
            )
        return list(presets[monarch])
    if isinstance(monarch, Sequence) and monarch and all(isinstance(n, str) for n in monarch):
        return list(monarch)
    raise TypeError(
        f"{factory}: monarch must be None, a bool, a preset name or a non-empty list of module "
        f"names, got {monarch!r}"
    )


def build_model(
    build: Callable[[torch.device | str | None], nn.Module],
    monarch: str | Sequence[str] | bool | None,
    presets: Mapping[str, Sequence[str]],
    default: str,
    nblocks: int,
    init: str,
    device: torch.device | str | None,
    factory: str,
) -> nn.Module:
    """``build(device)`` the dense model, then swap the linears ``monarch`` names for
    ``MonarchLinear(nblocks)``.

    With ``init="random"`` the model is built on the meta device, swapped, then materialised on
    ``device`` and initialised once (``reset_parameters``), which skips initialising dense weights
    that are thrown away. ``init="project"`` projects the initialised dense weights instead.
    """
    targets = _targets(monarch, presets, default, factory)
    if targets is None:
        return build(device)
    if init not in ("random", "project"):
        raise ValueError(f"{factory}: init must be 'random' or 'project', got {init!r}")
    target = torch.device(device) if device is not None else torch.get_default_device()
    lazy = init == "random" and target.type != "meta"
    model = build("meta" if lazy else device)
    swap_linear(model, MonarchConfig(nblocks=nblocks, init=init), target_modules=targets)
    if lazy:
        model.to_empty(device=target)
        model.reset_parameters()
    return model


def reset_other_modules(model: nn.Module, handled: tuple[type, ...]) -> None:
    """Call ``reset_parameters`` on the submodules a model's own init does not handle (e.g. the
    ``MonarchLinear`` layers that ``swap_linear`` put in)."""
    for m in model.modules():
        if m is not model and not isinstance(m, handled) and hasattr(m, "reset_parameters"):
            m.reset_parameters()
