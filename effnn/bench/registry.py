"""The registry of benchmark cases behind ``effnn bench``.

A *layer* (one op family: "monarch", later "biformer", "mod", ...) registers how to turn a shape
spec string into a :class:`Case`, which shapes run by default, and the name of its dense baseline.
A *case* is one shape; its ``build(provider, setting)`` returns a :class:`Workload` (the callable,
its inputs and its FLOP counts) for each *provider*:

- ``BASELINE``: the dense layer the issue compares against (``nn.Linear`` for Monarch);
- ``"auto"``, ``"ref"``, ``"triton"``, ``"ext"``: the effnn layer with that ``backend=``. A backend
  that cannot serve the input raises :class:`effnn.BackendError` (at build time or at the first
  call); the runner then skips that provider and prints the reason.

Adding a layer is one small module in ``effnn/bench/`` plus its name in ``_BUILTIN_MODULES``::

    from effnn.bench.registry import BASELINE, Case, Layer, Workload, parse_ints, register_layer

    def _case(spec: str) -> Case:
        dim, heads = parse_ints(spec, 2, "DIMxHEADS")
        def build(provider: str, s: Setting) -> Workload:
            T = s.token_count(4096, quick=1024)
            x = torch.randn(1, T, dim, device=s.device, dtype=s.dtype)
            if provider == BASELINE:
                layer = nn.MultiheadAttention(dim, heads, batch_first=True, device=..., dtype=...)
                fn = lambda x: layer(x, x, x, need_weights=False)[0]
            else:
                fn = BiLevelRoutingAttention(dim, heads, backend=provider, device=..., dtype=...)
            return Workload(fn, (x,), flops=forward_backward_flops(...), tokens=T, params=...)
        return Case("biformer", f"{dim}/h{heads}", f"dim={dim} heads={heads}", build, cost=dim * dim)

    register_layer(Layer(
        name="biformer", title="BiLevelRoutingAttention vs nn.MultiheadAttention",
        baseline="nn.MultiheadAttention", shape_format="DIMxHEADS (e.g. 512x8)",
        parse=_case, defaults=("512x8", "768x12"),
    ))
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

BASELINE = "baseline"
"""Provider name of a layer's dense baseline (passed to :attr:`Case.build`)."""

EFFNN_BACKENDS = ("auto", "ref", "triton", "ext")
"""Backends a case can be asked to build (the ``backend=`` argument of effnn layers)."""

FORWARD = "forward"
TRAIN = "forward+backward"
MODES = (FORWARD, TRAIN)

# Modules that register the built-in layers (imported on first use, so `import effnn.bench` is
# cheap). Add the module of a new layer here.
_BUILTIN_MODULES = ("effnn.bench.monarch", "effnn.bench.cb", "effnn.bench.mod", "effnn.bench.moe", "effnn.bench.biformer", "effnn.bench.sphereformer", "effnn.bench.gblr", "effnn.bench.asag")


@dataclass(frozen=True)
class Setting:
    """What every case of one run shares."""

    device: torch.device
    dtype: torch.dtype
    tokens: int | None = None  # None: the case's own default token count
    quick: bool = False  # --quick: cases may pick a smaller default token count

    def token_count(self, default: int, quick: int | None = None) -> int:
        """``--tokens`` when given, else the case's default (``quick`` under --quick)."""
        if self.tokens is not None:
            return self.tokens
        return quick if self.quick and quick is not None else default


@dataclass
class Workload:
    """One provider's callable for one case.

    ``fn(*inputs)`` returns one tensor. For forward+backward the runner makes the floating-point
    ``inputs`` require grad, calls ``fn(*inputs).backward(g)`` with a fixed random ``g`` and sets
    the grads of the inputs and of ``params`` (default: ``fn.parameters()`` when ``fn`` is an
    ``nn.Module``) to None between repetitions.

    ``flops`` maps a mode (:data:`FORWARD`, :data:`TRAIN`) to the *model* FLOPs of one call (what
    the algorithm needs, 2 per multiply-add; recomputation inside a kernel is not counted), used
    for the achieved GFLOP/s. ``backend`` is what actually runs; None lets the runner read it from
    the ``backend`` argument of the ``effnn::`` ops that the call dispatches.
    """

    fn: Callable[..., Tensor]
    inputs: tuple[Tensor, ...]
    flops: dict[str, float]
    tokens: int
    params: Sequence[Tensor] | None = None
    backend: str | None = None

    def parameters(self) -> list[Tensor]:
        if self.params is not None:
            return list(self.params)
        if isinstance(self.fn, nn.Module):
            return [p for p in self.fn.parameters() if p.requires_grad]
        return []


@dataclass(frozen=True)
class Case:
    """One shape of one layer."""

    layer: str
    name: str  # short and unique within the layer, e.g. "4096x4096/nb64"
    shape: str  # readable description, e.g. "in=4096 out=4096 nblocks=64"
    build: Callable[[str, Setting], Workload] = field(repr=False, compare=False)
    cost: float = 1.0  # relative cost against the layer's other cases, only for the ETA

    @property
    def label(self) -> str:
        return f"{self.layer}:{self.name}"


@dataclass(frozen=True)
class Layer:
    """A benchmarked layer: how to parse its shapes and which ones run by default."""

    name: str
    title: str  # e.g. "MonarchLinear vs nn.Linear"
    baseline: str  # provider name of the baseline in the results, e.g. "nn.Linear"
    shape_format: str  # for --help, e.g. "INxOUTxNBLOCKS (e.g. 4096x4096x64)"
    parse: Callable[[str], Case] = field(repr=False)
    defaults: tuple[str, ...] = ()
    quick: tuple[str, ...] | None = None  # shapes of --quick (None: the defaults)
    backends: tuple[str, ...] = ("ref", "triton", "ext")  # backends the effnn layer implements

    def cases(self, specs: Sequence[str] | None = None, quick: bool = False) -> list[Case]:
        if specs is None:
            specs = self.quick if quick and self.quick is not None else self.defaults
        return [self.parse(s) for s in specs]


_LAYERS: dict[str, Layer] = {}
_loaded = False


def register_layer(layer: Layer) -> Layer:
    """Register (or replace) a benchmarked layer; returns it."""
    _LAYERS[layer.name] = layer
    return layer


def layers() -> dict[str, Layer]:
    """All registered layers by name (the built-in ones are imported on the first call)."""
    global _loaded
    if not _loaded:
        _loaded = True
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)
    return dict(_LAYERS)


def get_layer(name: str) -> Layer:
    known = layers()
    if name not in known:
        raise ValueError(f"unknown layer {name!r}; registered layers: {', '.join(sorted(known))}")
    return known[name]


def parse_ints(spec: str, count: int | Sequence[int], fmt: str) -> tuple[int, ...]:
    """``"4096x4096x64"`` -> (4096, 4096, 64); ``count`` is the accepted number(s) of fields.

    Raises ``ValueError`` naming the spec and the expected format ``fmt``.
    """
    counts = (count,) if isinstance(count, int) else tuple(count)
    parts = spec.strip().lower().replace("*", "x").split("x")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) not in counts or any(v < 1 for v in values):
        raise ValueError(f"shape {spec!r} does not match {fmt} (positive integers)")
    return values


def linear_flops(tokens: int, macs_per_token: int) -> dict[str, float]:
    """Model FLOPs of a linear map: forward 2*T*MACs; forward+backward 3x that (grad of the input
    and of the weights)."""
    fwd = 2.0 * tokens * macs_per_token
    return {FORWARD: fwd, TRAIN: 3.0 * fwd}
