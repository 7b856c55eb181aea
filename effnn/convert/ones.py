"""OneS knowledge integration (Xue, He, Ren, Lou, You, "One Student Knows All Experts Know: From
Sparse to Dense", arXiv 2201.10890): turn a sparse MoE layer into one dense FFN of its experts'
shape ("knowledge gathering"), then refine the dense student by distillation from the whole MoE.

Gathering, for each expert tensor X_e in (fc1 weight, fc1 bias, fc2 weight, fc2 bias), e = 1..E:

    "sum"   X = sum_e X_e
    "avg"   X = (1/E) sum_e X_e
    "topk"  W = sum_e TopK_k(W_e)        TopK_k keeps the k entries of largest |.| (ties: lower
                                         flat index), zeroes the rest; default k = numel(W_e) // E
            b = (1/E) sum_e b_e
    "svd"   W = sum_e U_e,k S_e,k V_e,k^T   each expert's rank-k truncated SVD; default
                                         k = min(rows, cols) // E (at least 1)
            b = (1/E) sum_e b_e

The paper names these four methods (summation, averaging, Top-K Knowledge Gathering, SVD
Knowledge Gathering) and says that Top-KG and SVD-KG keep the key knowledge of each expert before
merging; its equations could not be read here and no official code is published, so the
selection rule, the default k and the bias rule of "topk" and "svd" are this library's reading.
docs/ones.md states exactly what was verified against which source.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effnn._dtensor import full_tensor
from effnn.nn.moe import FeedForward, MoE

__all__ = ["GATHER_METHODS", "distillation_loss", "gather_all_experts", "gather_experts"]

GATHER_METHODS = ("sum", "avg", "topk", "svd")


def _topk_sum(w: Tensor, k: int) -> Tensor:
    """sum_e of w[e] with all but its k largest-magnitude entries zeroed; w (E, rows, cols)."""
    flat = w.flatten(1)
    # a stable sort instead of topk: equal magnitudes keep the lower flat index on every device
    keep = torch.sort(flat.abs(), dim=1, descending=True, stable=True).indices[:, :k]
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, keep, True)
    return (flat * mask).sum(0).view(w.shape[1:])


def _svd_sum(w: Tensor, k: int) -> Tensor:
    """sum_e of the rank-k truncated SVD of w[e]; w (E, rows, cols)."""
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return torch.einsum("erk,ek,ekc->rc", u[..., :k], s[:, :k], vh[:, :k, :])


def _default_k(method: str, weight: Tensor, num_experts: int) -> int:
    if method == "topk":
        return max(1, weight[0].numel() // num_experts)
    return max(1, min(weight.shape[1:]) // num_experts)


def gather_experts(moe: MoE, method: str, *, k: int | None = None) -> FeedForward:
    """One dense :class:`~effnn.nn.moe.FeedForward` of the experts' shape holding the knowledge
    of all experts of ``moe`` (OneS knowledge gathering; the equations are in
    :mod:`effnn.convert.ones`).

    Args:
        moe: an :class:`effnn.MoE`; it is not modified.
        method: "sum", "avg", "topk" (Top-KG) or "svd" (SVD-KG).
        k: for "topk", entries kept in each expert weight matrix (default numel // E: the
            gathered matrix has at most one expert's number of non-zeros); for "svd", the rank kept
            of each expert weight matrix (default min(rows, cols) // E, so that the E truncations
            together span at most one full-rank matrix). Not allowed for "sum" and "avg".

    Returns a FeedForward on ``moe``'s device and dtype, with its activation and bias setting.
    The computation runs in float32 (float64 for a float64 MoE).

    Example::

        >>> moe = effnn.MoE(64, 256, num_experts=4)
        >>> ffn = effnn.gather_experts(moe, "svd")          # rank 16 of each expert, summed
        >>> ffn = effnn.gather_experts(moe, "topk", k=2048)  # 2048 entries per expert matrix
    """
    if not isinstance(moe, MoE):
        raise TypeError(f"gather_experts: moe must be an effnn.MoE, got {type(moe).__name__}")
    if method not in GATHER_METHODS:
        raise ValueError(f"gather_experts: method must be one of {GATHER_METHODS}, got {method!r}")
    E = moe.num_experts
    if method in ("sum", "avg"):
        if k is not None:
            raise ValueError(f"gather_experts: k applies to 'topk' and 'svd' only, got k={k!r} with {method!r}")
    else:
        limit = moe.dim * moe.hidden_dim if method == "topk" else min(moe.dim, moe.hidden_dim)
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= limit):
            what = "entries per expert matrix" if method == "topk" else "the rank per expert matrix"
            raise ValueError(f"gather_experts: k ({what}) must be an int in [1, {limit}], got {k!r}")
    weight = moe.fc1_weight
    dtype = weight.dtype
    compute = torch.promote_types(dtype, torch.float32)
    tensors = {
        "fc1.weight": moe.fc1_weight, "fc2.weight": moe.fc2_weight,
        "fc1.bias": moe.fc1_bias, "fc2.bias": moe.fc2_bias,
    }
    merge: dict[str, Callable[[Tensor], Tensor]] = {
        "sum": lambda t: t.sum(0),
        "avg": lambda t: t.mean(0),
    }
    gathered: dict[str, Tensor] = {}
    for name, t in tensors.items():
        if t is None:
            continue
        t = full_tensor(t.detach()).to(compute)
        if method in merge:
            gathered[name] = merge[method](t)
        elif name.endswith("bias"):
            gathered[name] = t.mean(0)
        else:
            rank = k if k is not None else _default_k(method, t, E)
            gathered[name] = _topk_sum(t, rank) if method == "topk" else _svd_sum(t, rank)
    ffn = FeedForward(moe.dim, moe.hidden_dim, moe.activation, moe.fc1_bias is not None,
                      device=weight.device, dtype=dtype)
    with torch.no_grad():
        for name, value in gathered.items():
            ffn.get_parameter(name).copy_(value)
    return ffn


def gather_all_experts(model: nn.Module, method: str, *, k: int | None = None) -> nn.Module:
    """Replace every :class:`effnn.MoE` inside ``model`` by ``gather_experts(moe, method, k=k)``,
    in place; returns ``model`` (the OneS student, to be refined by distillation).

    Raises ``ValueError`` if ``model`` holds no MoE, ``TypeError`` if ``model`` is itself an MoE
    (call :func:`gather_experts` on it).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"gather_all_experts: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, MoE):
        raise TypeError("gather_all_experts: model is itself an MoE; use gather_experts(moe, method)")
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]
    if not found:
        raise ValueError(f"gather_all_experts: no effnn.MoE found in {type(model).__name__}")
    for name, moe in found:
        model.set_submodule(name, gather_experts(moe, method, k=k))
    return model


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor | None = None,
    *,
    temperature: float = 1.0,
    alpha: float = 0.5,
) -> Tensor:
    """The knowledge-distillation loss of the OneS refinement step (Hinton et al., 2015): the MoE
    teacher's softened predictions train the dense student.

        kd   = T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over the rows
        loss = kd                                     if target is None
               alpha * kd + (1 - alpha) * CE(student, target)   otherwise

    The teacher logits are detached. Logits have shape (..., classes); ``target`` holds class
    indices of shape (...). The paper's temperature and weighting are not known here (see
    docs/ones.md); T = 1 and alpha = 0.5 are defaults, not the paper's values.
    """
    for name, t in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(t, Tensor) or not t.is_floating_point() or t.dim() < 1:
            raise TypeError(f"distillation_loss: {name} must be a floating-point tensor (..., classes), got {t!r:.80}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"distillation_loss: student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} must have the same shape"
        )
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"distillation_loss: temperature must be a number > 0, got {temperature!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"distillation_loss: alpha must be a number in [0, 1], got {alpha!r}")
    classes = student_logits.shape[-1]
    s = student_logits.reshape(-1, classes).float() / temperature
    t = teacher_logits.detach().reshape(-1, classes).float() / temperature
    kd = F.kl_div(s.log_softmax(-1), t.log_softmax(-1), reduction="batchmean", log_target=True)
    kd = kd * temperature**2
    if target is None:
        return kd
    if not isinstance(target, Tensor) or target.dtype != torch.long or target.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"distillation_loss: target must be a long tensor of shape {tuple(student_logits.shape[:-1])}, "
            f"got {target.dtype if isinstance(target, Tensor) else type(target).__name__} "
            f"{tuple(target.shape) if isinstance(target, Tensor) else ''}"
        )
    ce = F.cross_entropy(s * temperature, target.reshape(-1))
    return alpha * kd + (1 - alpha) * ce
