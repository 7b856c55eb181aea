"""Token routing of Mixture-of-Depths (Raposo et al., 2024, arXiv 2404.02258).

A routed block processes, per sequence, only the k = ceil(capacity * T) tokens with the largest
router scores (expert-choice top-k, so k is static and so is the compute graph), and updates them
as x_i + r_i * f(X~)_i, where X~ is the routed subset in its original order; every other token is
passed through unchanged (the paper's eq. 1 and section 3.4).

The functions here are the routing steps, plain vectorised PyTorch (no loop over the batch):

- :func:`mod_capacity`: k for a sequence length and a capacity;
- :func:`mod_topk`: the routed positions, sorted, with deterministic tie-breaking in float32;
- :func:`mod_gather` / :func:`mod_scatter`: batched gather of the routed tokens and the
  out-of-place write-back of their new values (``index_select`` / ``index_copy`` on the flattened
  batch);
- :func:`mod_update`: x_i + r_i * (block(X~)_i - x_i) for the routed tokens;
- :func:`topk_targets` and :func:`routing_loss`: the auxiliary binary cross-entropy of section 3.5
  (and gamma-MoD's routing loss, the same loss on its two-way router).

None of them is a registered ``torch.library`` op: they are built from native ops that
``torch.compile``, ``torch.export`` and the FLOP counters already handle (the block's own FLOPs
are counted on the k routed tokens), so a custom op would add nothing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "mod_capacity",
    "mod_topk",
    "mod_gather",
    "mod_scatter",
    "mod_update",
    "topk_targets",
    "routing_loss",
]


def mod_capacity(tokens: int, capacity: float) -> int:
    """k = ceil(capacity * tokens), the number of routed tokens per sequence (0 when tokens = 0).

    The product is rounded to 9 decimals before the ceiling, so that capacities written in decimal
    give the intended k (0.1 * 30 is 3.0000000000000004 in floating point; k is 3, not 4).
    """
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise ValueError(f"mod_capacity: tokens must be an int >= 0, got {tokens!r}")
    check_capacity(capacity, "mod_capacity")
    if tokens == 0:
        return 0
    return min(tokens, max(1, math.ceil(round(capacity * tokens, 9))))


def check_capacity(capacity: float, where: str) -> None:
    if isinstance(capacity, bool) or not isinstance(capacity, (int, float)) or not 0 < capacity <= 1:
        raise ValueError(f"{where}: capacity must be a number in (0, 1], got {capacity!r}")


def mod_topk(
    scores: Tensor, k: int, keep_mask: Tensor | None = None, keep_first: int = 0
) -> Tensor:
    """Positions of the k routed tokens of every sequence, ascending: (B, k) int64.

    ``scores`` (B, T): router scores (compared in float32). A token is routed if it is among the k
    largest scores of its sequence. Ties are broken by position (the earlier token wins), so the
    result is deterministic on every device. Tokens in ``keep_mask`` (B, T) bool and the first
    ``keep_first`` tokens of every sequence are routed before all others (gamma-MoD's masked
    routing: its +1 on their probability has the same effect); if a sequence has more of them
    than k, the k of them with the largest scores are routed, as in gamma-MoD. A NaN score
    ranks below every number. The positions are sorted, so the routed subset keeps the causal order.
    """
    if scores.dim() != 2:
        raise ValueError(f"mod_topk: scores must have shape (B, T), got {tuple(scores.shape)}")
    B, T = scores.shape
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= T:
        raise ValueError(f"mod_topk: k must be an int in [0, {T}], got {k!r}")
    s = torch.nan_to_num(scores.float(), nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    # a stable descending sort ranks equal scores by position: deterministic tie-breaking
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    forced = None
    if keep_mask is not None:
        forced = keep_mask
    if keep_first > 0:
        first = torch.arange(T, device=scores.device) < keep_first
        forced = first.expand(B, T) if forced is None else forced | first
    if forced is not None:
        # second stable sort on the forced flag: forced tokens first, each group in score order
        rank = torch.gather(forced, 1, order).to(torch.uint8)
        order = torch.gather(order, 1, torch.sort(rank, dim=1, descending=True, stable=True).indices)
    return torch.sort(order[:, :k], dim=1).values


def _flat_index(idx: Tensor, tokens: int) -> Tensor:
    """Row indices of (B, k) positions in the (B*T, D) view of a (B, T, D) tensor."""
    offsets = torch.arange(idx.shape[0], device=idx.device).unsqueeze(1) * tokens
    return (idx + offsets).reshape(-1)


def mod_gather(x: Tensor, idx: Tensor) -> Tensor:
    """The routed tokens x[b, idx[b]]: (B, T, D) and (B, k) -> (B, k, D)."""
    B, T, D = x.shape
    return x.reshape(B * T, D).index_select(0, _flat_index(idx, T)).view(B, idx.shape[1], D)


def mod_scatter(x: Tensor, idx: Tensor, y: Tensor) -> Tensor:
    """A new tensor equal to x (B, T, D) except rows idx (B, k), which are y (B, k, D)."""
    B, T, D = x.shape
    out = x.reshape(B * T, D).index_copy(0, _flat_index(idx, T), y.reshape(-1, D))
    return out.view(B, T, D)


def mod_update(x_sel: Tensor, out_sel: Tensor, weight: Tensor) -> Tensor:
    """x_i + r_i * f_i for routed tokens, with the branch f = out - x recovered from a block that
    returns x + f(x).

    ``x_sel``, ``out_sel``: (B, k, D), ``weight``: (B, k) router weights r. The arithmetic runs in
    float32 (or float64) whatever the input dtype, so the subtraction adds no rounding beyond the
    block's own; the result has the dtype of ``x_sel``.
    """
    dtype = torch.promote_types(x_sel.dtype, torch.float32)
    x32 = x_sel.to(dtype)
    y = x32 + weight.to(dtype).unsqueeze(-1) * (out_sel.to(dtype) - x32)
    return y.to(x_sel.dtype)


def topk_targets(idx: Tensor, tokens: int) -> Tensor:
    """Float (B, T) targets of the auxiliary loss: 1 where a token was routed, else 0."""
    targets = torch.zeros(idx.shape[0], tokens, device=idx.device)
    return targets.scatter_(1, idx, 1.0)


def routing_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Binary cross-entropy of router (or predictor) logits against top-k membership, averaged
    over all tokens (section 3.5 of the MoD paper: "the router's outputs provide the logits, and
    the top-k selections of these logits provide the targets").

    gamma-MoD's routing loss, a two-class cross-entropy of its router's logits (l0, l1), is the
    same number for the logit l1 - l0 (``GammaRouter`` returns that logit).
    """
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float())
