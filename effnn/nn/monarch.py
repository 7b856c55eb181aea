"""``MonarchLinear``: a drop-in replacement of ``nn.Linear`` by a Monarch matrix."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from effnn._dtensor import full_tensor
from effnn.ops._dispatch import BACKENDS
from effnn.ops.monarch import (
    monarch_factor_shapes,
    monarch_linear,
    monarch_project,
    monarch_to_dense,
)

# Each factor is drawn like fly's (uniform with bound 1/sqrt(its block fan-in)) times 3**(1/4):
# fly's two factors give a third of nn.Linear's output variance, this gives exactly nn.Linear's.
_FACTOR_GAIN = 3**0.25


class MonarchLinear(nn.Module):
    r"""A linear layer whose weight is a Monarch matrix (Dao et al., "Monarch: Expressive
    Structured Matrices for Efficient and Accurate Training", ICML 2022).

    :math:`y = P_{out} \, \mathrm{BD}(w_2) \, P_{mid} \, \mathrm{BD}(w_1) \, x + b`: two
    block-diagonal factors with ``nblocks`` blocks each and the "perfect shuffle" permutations
    between and after them, exactly as the official ``MonarchLinear`` of HazyResearch/fly, whose
    checkpoints load with ``load_state_dict``: parameters ``blkdiag1``, ``blkdiag2`` (shapes from
    :func:`effnn.ops.monarch.monarch_factor_shapes`) and ``bias`` (out_features,). Sizes that do not
    divide by ``nblocks`` are handled as fly does: the input is zero-padded to
    nblocks*ceil(in/nblocks) features and the output truncated.

    ``nblocks=4`` keeps about half the parameters of a square layer; ``nblocks = sqrt(n)`` is the
    paper's rank-1 Monarch (2 n^1.5 parameters). Parameters and multiply-adds per token:
    min(in, out) * (in + out) / nblocks (with padded sizes).

    Initialisation differs from fly on purpose: the output variance equals ``nn.Linear``'s (fly's is
    a third of it), and the bias bound is 1/sqrt(in_features) as in ``nn.Linear``.

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``.
        nblocks: number of blocks of each factor.
        backend: "auto", "ref" (plain PyTorch), "triton" (CUDA) or "ext" (compiled CPU kernel).

    Shape: input (..., in_features), output (..., out_features); 1-D input is a single vector.

    Example::

        >>> layer = MonarchLinear(1024, 4096, nblocks=4)
        >>> layer(torch.randn(8, 128, 1024)).shape
        torch.Size([8, 128, 4096])
        >>> dense = nn.Linear(768, 768)
        >>> mon = MonarchLinear.from_linear(dense, nblocks=4)  # best Monarch approximation
        >>> exact = mon.to_linear()  # the dense equivalent of mon
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        nblocks: int = 4,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_features", in_features),
            ("out_features", out_features),
            ("nblocks", nblocks),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MonarchLinear: {name} must be a positive int, got {value!r}")
        if backend not in BACKENDS:
            raise ValueError(f"MonarchLinear: backend must be one of {BACKENDS}, got {backend!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.nblocks = nblocks
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        shape1, shape2 = monarch_factor_shapes(in_features, out_features, nblocks)
        # registration order as fly's (bias first), so its optimizer states line up too
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.blkdiag1 = nn.Parameter(torch.empty(shape1, **factory))
        self.blkdiag2 = nn.Parameter(torch.empty(shape2, **factory))
        self.reset_parameters()

    @property
    def in_features_extended(self) -> int:
        return self.blkdiag1.shape[0] * self.blkdiag1.shape[2]

    @property
    def out_features_extended(self) -> int:
        return self.blkdiag2.shape[0] * self.blkdiag2.shape[1]

    @property
    def saving(self) -> float:
        """Fraction of the dense weight's parameters (and multiply-adds) this layer uses."""
        return (self.blkdiag1.numel() + self.blkdiag2.numel()) / (self.in_features * self.out_features)

    def reset_parameters(self) -> None:
        for factor in (self.blkdiag1, self.blkdiag2):
            bound = _FACTOR_GAIN / math.sqrt(factor.shape[2])
            nn.init.uniform_(factor, -bound, bound)
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"MonarchLinear: input must be a Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"MonarchLinear: input must have shape (..., {self.in_features}), "
                f"got {tuple(x.shape)}"
            )
        return monarch_linear(
            x, self.blkdiag1, self.blkdiag2, self.bias, self.out_features, backend=self.backend
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, nblocks={self.nblocks}"
        )

    # ---- conversions ------------------------------------------------------------------------

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, nblocks: int = 4, init: str = "project", backend: str = "auto"
    ) -> MonarchLinear:
        """A MonarchLinear on ``linear``'s device and dtype.

        ``init="project"``: the factors closest to ``linear.weight`` in Frobenius norm (exact when
        the weight already is a Monarch matrix in this layout), bias copied. ``init="random"``:
        fresh initialisation. On the ``meta`` device the parameters stay uninitialised (call
        ``to_empty`` and ``reset_parameters`` or load a state dict, as with FSDP2).
        """
        if init not in ("project", "random"):
            raise ValueError(f"MonarchLinear.from_linear: init must be 'project' or 'random', got {init!r}")
        weight = linear.weight
        with torch.device("meta"):
            layer = cls(
                linear.in_features, linear.out_features, bias=linear.bias is not None,
                nblocks=nblocks, dtype=weight.dtype, backend=backend,
            )
        layer.to_empty(device=weight.device)
        if weight.is_meta:
            return layer
        if init == "random":
            layer.reset_parameters()
            return layer
        with torch.no_grad():
            blkdiag1, blkdiag2 = monarch_project(weight.detach(), nblocks)
            layer.blkdiag1.copy_(blkdiag1)
            layer.blkdiag2.copy_(blkdiag2)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def to_linear(self) -> nn.Linear:
        """The exact dense ``nn.Linear`` equivalent of this layer."""
        weight = self.blkdiag1
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None,
            device=weight.device, dtype=weight.dtype,
        )
        if weight.is_meta:
            return linear
        with torch.no_grad():
            linear.weight.copy_(self.dense_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def dense_weight(self) -> Tensor:
        """The (out_features, in_features) matrix this layer applies (without bias).

        Sharded (FSDP2/DTensor) factors are gathered first."""
        w1, w2 = full_tensor(self.blkdiag1), full_tensor(self.blkdiag2)
        return monarch_to_dense(w1, w2, self.in_features, self.out_features)
