"""``ContextBroadcast``: Context Broadcasting (CB), uniform attention added to every token.

Hyeon-Woo et al., "Scratching Visual Transformer's Back with Uniform Attention", ICCV 2023
(arXiv 2210.08457). See docs/cb.md for what was verified against which source.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["ContextBroadcast", "context_broadcast"]

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _token_dims(token_dim: int | Sequence[int], owner: str) -> tuple[int, ...]:
    """``token_dim`` as a non-empty tuple of ints (validated for type only)."""
    if isinstance(token_dim, int):
        dims = (token_dim,)
    elif isinstance(token_dim, Sequence) and not isinstance(token_dim, str):
        dims = tuple(token_dim)
    else:
        dims = ()
    if not dims or any(isinstance(d, bool) or not isinstance(d, int) for d in dims):
        raise TypeError(
            f"{owner}: token_dim must be an int or a non-empty sequence of ints, got {token_dim!r}"
        )
    return dims


def _check_input(x: Tensor, dims: tuple[int, ...], owner: str) -> tuple[int, ...]:
    """Validate ``x`` against the token axes ``dims``; return them as non-negative, sorted."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{owner}: input must be a Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{owner}: input must be a floating-point tensor, got {x.dtype}")
    ndim = x.dim()
    if any(not -ndim <= d < ndim for d in dims):
        raise ValueError(
            f"{owner}: token_dim={dims if len(dims) > 1 else dims[0]} is out of range for an input "
            f"of shape {tuple(x.shape)} ({ndim} dimensions)"
        )
    positive = tuple(sorted(d % ndim for d in dims))
    if len(set(positive)) != len(positive):
        raise ValueError(f"{owner}: token_dim={dims} names a dimension twice")
    if len(positive) == ndim:
        raise ValueError(
            f"{owner}: token_dim={dims if len(dims) > 1 else dims[0]} covers every dimension of "
            f"the input of shape {tuple(x.shape)}; the input needs a feature dimension besides "
            "the token dimension(s)"
        )
    if any(x.shape[d] == 0 for d in positive):
        raise ValueError(
            f"{owner}: the input of shape {tuple(x.shape)} has no tokens along token_dim="
            f"{dims if len(dims) > 1 else dims[0]}; the mean over zero tokens is undefined"
        )
    return positive


def context_broadcast(x: Tensor, token_dim: int | Sequence[int] = 1) -> Tensor:
    r"""Context Broadcasting: :math:`x_i \leftarrow \tfrac12 \big(x_i + \tfrac1N \sum_j x_j\big)`.

    Every token is averaged with the mean of all N tokens along ``token_dim`` (the class token
    included), i.e. the tokens are mixed by :math:`\tfrac12 (I + \tfrac1N \mathbf{1}\mathbf{1}^\top)`:
    half identity, half uniform attention. ``token_dim`` may be a tuple (e.g. ``(2, 3)`` for the
    spatial axes of an NCHW feature map). Returns a new tensor of the input's shape and dtype;
    half-precision inputs take the mean in float32.

    A NaN or inf in any token reaches every token through the mean (as it would through dense
    attention).
    """
    dims = _check_input(x, _token_dims(token_dim, "context_broadcast"), "context_broadcast")
    return _broadcast(x, dims)


def _broadcast(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    if x.dtype in _HALF_DTYPES:
        mean = x.mean(dims, keepdim=True, dtype=torch.float32).to(x.dtype)
    else:
        mean = x.mean(dims, keepdim=True)
    # 0.5*mean + 0.5*x in one pass over x; it is exactly (x + mean) / 2 in floating point (halving
    # commutes with rounding, subnormals aside) and cannot overflow where x and mean do not
    return torch.add(mean.mul(0.5), x, alpha=0.5)


class ContextBroadcast(nn.Module):
    r"""Context Broadcasting (CB) of Hyeon-Woo et al., "Scratching Visual Transformer's Back with
    Uniform Attention", ICCV 2023 (arXiv 2210.08457).

    :math:`\mathrm{CB}(x)_i = \tfrac12 \big(x_i + \tfrac1N \sum_{j=1}^N x_j\big)`: each token is
    averaged with the mean of all tokens (class token included), which adds a uniform attention
    map to the model at the cost of one reduction and one elementwise pass, with no parameters.
    The paper inserts it after the MLP of every transformer block (on the MLP's output, before the
    residual addition); :func:`effnn.insert_cb` does that in an existing model without changing
    its ``state_dict``.

    Args:
        token_dim: the token axis (default 1, for (batch, tokens, features) as in timm and HF
            ViTs), or a tuple of axes (e.g. ``(1, 2)`` for (B, H, W, C) feature maps).

    Shape: any floating-point input with at least one axis besides the token axes; the output has
    the input's shape and dtype.

    Example::

        >>> cb = ContextBroadcast()
        >>> x = torch.randn(2, 197, 384)
        >>> y = cb(x)                                   # (2, 197, 384)
        >>> torch.allclose(y, (x + x.mean(1, keepdim=True)) / 2)
        True
    """

    def __init__(self, token_dim: int | Sequence[int] = 1) -> None:
        super().__init__()
        dims = _token_dims(token_dim, "ContextBroadcast")
        self.token_dim: int | tuple[int, ...] = dims[0] if len(dims) == 1 else dims

    def forward(self, x: Tensor) -> Tensor:
        dims = (self.token_dim,) if isinstance(self.token_dim, int) else self.token_dim
        return _broadcast(x, _check_input(x, dims, "ContextBroadcast"))

    def extra_repr(self) -> str:
        return f"token_dim={self.token_dim}"
