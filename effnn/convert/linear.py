"""Rewrite existing models: swap ``nn.Linear`` layers for effnn layers.

The API follows torchao's ``quantize_(model, config, filter_fn)`` and PEFT's ``target_modules``::

    model = effnn.swap_linear(model, effnn.MonarchConfig(nblocks=4), target_modules="all-linear")

A config is a small frozen dataclass that builds the new layer from the old one and round-trips
through JSON, so that :func:`effnn.save` can store it beside the weights.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

from torch import nn

from effnn.nn.gblr import GaudiGBLRLinear
from effnn.nn.monarch import MonarchLinear
from effnn.ops._dispatch import BACKENDS

__all__ = ["MonarchConfig", "GBLRConfig", "swap_linear", "config_from_dict", "config_to_dict", "config_of"]

_HEAD_NAMES = ("lm_head", "head", "classifier")


@dataclasses.dataclass(frozen=True)
class MonarchConfig:
    """Swap ``nn.Linear`` for :class:`effnn.MonarchLinear`.

    Args:
        nblocks: blocks per factor (4 keeps about half of a square layer; sqrt(n) is rank-1 Monarch).
        init: "project" starts from the best Monarch approximation of the existing weight (bias
            copied); "random" initialises afresh (variance of ``nn.Linear``).
        backend: the new layers' backend ("auto", "ref", "triton", "ext").
    """

    nblocks: int = 4
    init: str = "project"
    backend: str = "auto"

    module_type: ClassVar[type[nn.Module]] = MonarchLinear

    def __post_init__(self) -> None:
        if isinstance(self.nblocks, bool) or not isinstance(self.nblocks, int) or self.nblocks < 1:
            raise ValueError(f"MonarchConfig: nblocks must be a positive int, got {self.nblocks!r}")
        if self.init not in ("project", "random"):
            raise ValueError(f"MonarchConfig: init must be 'project' or 'random', got {self.init!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"MonarchConfig: backend must be one of {BACKENDS}, got {self.backend!r}")

    def build(self, linear: nn.Linear) -> MonarchLinear:
        return MonarchLinear.from_linear(linear, self.nblocks, init=self.init, backend=self.backend)

    @classmethod
    def of(cls, module: MonarchLinear) -> MonarchConfig:
        """The config that rebuilds ``module``'s structure (weights are loaded separately)."""
        return cls(nblocks=module.nblocks, init="random", backend=module.backend)


@dataclasses.dataclass(frozen=True)
class GBLRConfig:
    """Swap ``nn.Linear`` for :class:`effnn.GaudiGBLRLinear` (learned structure, Lee & Kim 2024).

    Args:
        budget: with ``init="project"``, the fraction of the dense multiply-adds the initial
            structure may cost (:meth:`GaudiGBLRLinear.from_linear`).
        rank_per_component, num_components: as :class:`GaudiGBLRLinear` (None: min(in, out) // r).
        sigma: the Gaussian's width; None (default) turns it off, as the official fine-tuning
            from dense checkpoints.
        init: "project" fits the structure and factors to the existing weight (bias copied);
            "random" starts afresh with the official 'splr' widths (dense-equivalent cost).
        steps: with ``init="project"``, the gradient steps of the fit (0: the truncated SVD and
            the block pursuit only, seconds instead of minutes per layer on a CPU).
        backend: the new layers' backend.
    """

    budget: float = 0.4
    rank_per_component: int = 1
    num_components: int | None = None
    sigma: float | None = None
    init: str = "project"
    steps: int = 1000
    backend: str = "auto"

    module_type: ClassVar[type[nn.Module]] = GaudiGBLRLinear

    def __post_init__(self) -> None:
        if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)) or not 0 < self.budget <= 1:
            raise ValueError(f"GBLRConfig: budget must be in (0, 1], got {self.budget!r}")
        if self.init not in ("project", "random"):
            raise ValueError(f"GBLRConfig: init must be 'project' or 'random', got {self.init!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"GBLRConfig: steps must be a non-negative int, got {self.steps!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"GBLRConfig: backend must be one of {BACKENDS}, got {self.backend!r}")

    def build(self, linear: nn.Linear) -> GaudiGBLRLinear:
        if self.init == "project":
            return GaudiGBLRLinear.from_linear(
                linear, self.budget, rank_per_component=self.rank_per_component,
                num_components=self.num_components, sigma=self.sigma, backend=self.backend,
                steps=self.steps,
            )
        return GaudiGBLRLinear(
            linear.in_features, linear.out_features, self.rank_per_component, self.num_components,
            sigma=self.sigma, bias=linear.bias is not None, device=linear.weight.device,
            dtype=linear.weight.dtype, backend=self.backend,
        )

    @classmethod
    def of(cls, module: GaudiGBLRLinear) -> GBLRConfig:
        """The config that rebuilds ``module``'s shapes (weights and sigma are loaded separately)."""
        return cls(rank_per_component=module.rank_per_component, num_components=module.num_components,
                   sigma=1.0 if module.gaussian else None, init="random", backend=module.backend)


_CONFIGS: dict[str, type] = {"MonarchConfig": MonarchConfig, "GBLRConfig": GBLRConfig}
_CONFIG_FORMAT = 1


def config_to_dict(config: Any) -> dict[str, Any]:
    return {"type": type(config).__name__, "version": _CONFIG_FORMAT, **dataclasses.asdict(config)}


def config_from_dict(data: dict[str, Any]) -> Any:
    data = dict(data)
    name, version = data.pop("type", None), data.pop("version", None)
    if name not in _CONFIGS:
        raise ValueError(f"unknown effnn config type {name!r}; known: {sorted(_CONFIGS)}")
    if version != _CONFIG_FORMAT:
        raise ValueError(f"{name}: config format version {version} is not supported (expected {_CONFIG_FORMAT})")
    return _CONFIGS[name](**data)


def config_of(module: nn.Module) -> Any | None:
    """The config that rebuilds an effnn layer in place of an ``nn.Linear``, or None."""
    for config_type in _CONFIGS.values():
        if type(module) is config_type.module_type:
            return config_type.of(module)
    return None


def _name_matcher(spec: str | Iterable[str], argument: str) -> Callable[[str], bool]:
    """PEFT's rule: a string is a regex that must match the whole name; a list holds exact names or
    name suffixes (``"fc1"`` matches ``"blocks.0.mlp.fc1"``)."""
    if isinstance(spec, str):
        pattern = re.compile(spec)
        return lambda fqn: pattern.fullmatch(fqn) is not None
    names = list(spec)
    if not all(isinstance(n, str) for n in names):
        raise TypeError(f"swap_linear: {argument} must be a string or a list of strings, got {spec!r}")
    return lambda fqn: any(fqn == n or fqn.endswith("." + n) for n in names)


def _output_heads(model: nn.Module) -> set[int]:
    """Ids of the modules that are the model's output head (HF, timm, or by name)."""
    heads = set()
    for getter in ("get_output_embeddings", "get_classifier"):
        fn = getattr(model, getter, None)
        if callable(fn):
            try:
                head = fn()
            except (NotImplementedError, AttributeError):
                head = None
            if isinstance(head, nn.Module):
                heads.add(id(head))
    for fqn, module in model.named_modules():
        if fqn.rsplit(".", 1)[-1] in _HEAD_NAMES:
            heads.add(id(module))
    return heads


def swap_linear(
    model: nn.Module,
    config: Any,
    *,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    target_modules: str | Iterable[str] | None = None,
    exclude_modules: str | Iterable[str] | None = None,
) -> nn.Module:
    """Replace ``nn.Linear`` submodules of ``model`` in place by the layers ``config`` builds.

    Args:
        model: any ``nn.Module``; may live on the ``meta`` device (the new layers then stay
            uninitialised, to be materialised with ``to_empty`` + ``reset_parameters`` as FSDP2 does).
        config: e.g. ``MonarchConfig(nblocks=4, init="project")``.
        filter_fn: ``filter_fn(module, fqn) -> bool``; only linears it accepts are swapped.
        target_modules: names to swap: a regex matched against the full name, a list of names or
            name suffixes, or ``"all-linear"`` (every linear except the output head:
            ``get_output_embeddings()``, ``get_classifier()``, or a module named lm_head, head or
            classifier). Default: every ``nn.Linear``.
        exclude_modules: names never to swap, with the same rules as ``target_modules``.

    Returns ``model``. Raises ``ValueError`` if nothing matched. The new layers keep
    ``in_features``, ``out_features``, device and dtype of the linears they replace.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"swap_linear: model must be an nn.Module, got {type(model).__name__}")
    if type(config).__name__ not in _CONFIGS:
        raise TypeError(f"swap_linear: config must be one of {sorted(_CONFIGS)}, got {config!r}")
    if isinstance(model, nn.Linear):
        raise TypeError(
            "swap_linear: model is itself an nn.Linear and cannot be replaced in place; "
            f"use {config.module_type.__name__}.from_linear(linear, ...)"
        )
    heads: set[int] = set()
    include: Callable[[str], bool] = lambda fqn: True  # noqa: E731
    if target_modules == "all-linear":
        heads = _output_heads(model)
    elif target_modules is not None:
        include = _name_matcher(target_modules, "target_modules")
    exclude = _name_matcher(exclude_modules, "exclude_modules") if exclude_modules is not None else None

    linears = [(fqn, m) for fqn, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen = [
        (fqn, m)
        for fqn, m in linears
        if id(m) not in heads
        and include(fqn)
        and not (exclude and exclude(fqn))
        and (filter_fn is None or filter_fn(m, fqn))
    ]
    if not chosen:
        shown = ", ".join(fqn for fqn, _ in linears[:8]) or "none"
        raise ValueError(
            f"swap_linear: no nn.Linear matched (target_modules={target_modules!r}, "
            f"exclude_modules={exclude_modules!r}, filter_fn={filter_fn!r}); "
            f"the model's linears are: {shown}{' ...' if len(linears) > 8 else ''}"
        )
    for fqn, linear in chosen:
        model.set_submodule(fqn, config.build(linear))
    return model
