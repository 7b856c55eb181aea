"""Bi-level routing attention (BRA) of BiFormer (Zhu et al., "BiFormer: Vision Transformer with
Bi-Level Routing Attention", CVPR 2023), with the semantics of the official ``ops/bra_legacy.py``
(rayleizhu/BiFormer), whose checkpoints every released model uses.

Layouts shared by every function and backend:

- a feature map (N, H, W, C) is cut into a grid of ``grid_h x grid_w`` regions of
  ``region_h x region_w`` tokens (:func:`region_grid`); region ``p = i * grid_w + j`` covers rows
  ``i*region_h ...`` and columns ``j*region_w ...`` of the (padded) map;
- *region-major* tensors are (N, P, T, C): P = grid_h * grid_w regions, the T = region_h * region_w
  tokens of a region in row-major order (the official ``rearrange(... "n (j h) (i w) c -> n (j i)
  (h w) c")``);
- channels are head-major: channel ``c = head * head_dim + i``, as the official code splits them.

The two levels are separate functions:

1. :func:`region_means` and :func:`bra_routing`: region-level queries and keys are the means of
   each region's tokens; ``logits = (q_r * scale) @ k_r^T`` (N, P, P); each query region keeps its
   ``topk`` regions (``torch.topk``, float32) and ``softmax`` of their logits as weights. One routing
   graph is shared by all heads, and it is detached unless ``diff_routing``.
2. :func:`routed_attention`, the registered op ``effnn::routed_attention``: every query token
   attends, per head, to the tokens of the ``topk`` regions its region routed to (softmax over all
   of them at once), optionally with the keys and values of routed region ``j`` multiplied by
   ``r_weight[..., j]`` (``soft_routing``) and padded keys masked out.

:func:`bi_level_routing_attention` is the whole layer (padding, projections, routing, attention,
local context enhancement, output projection) that ``effnn.BiLevelRoutingAttention`` calls.

The reference backend never builds the official code's buffers: its ``torch.gather`` from a
view expanded to (N, P, P, T, C) materialises a copy of the routed keys and values per query region
and, in the backward, a dense zero buffer of P times the K/V size. Here the routed regions are
picked with ``index_select`` from region-major keys and values (backward: ``index_add``; one copy
for both when they are channel slices of the layer's one projection), the copy lives only inside
the forward and inside the backward (autograd keeps q, k, v, the output and the log-sum-exp), and
the attention itself runs on PyTorch's fused CPU flash-attention kernels.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from effnn.flops import register_macs
from effnn.ops._dispatch import select_backend, triton_device_reasons

__all__ = [
    "PADDING_MODES",
    "KV_DOWNSAMPLE_MODES",
    "RegionGrid",
    "Routing",
    "region_grid",
    "region_means",
    "bra_routing",
    "routed_attention",
    "routed_attention_ref",
    "routed_attention_backward_ref",
    "bi_level_routing_attention",
]

# "none": sizes must divide by n_win. "legacy" (official ops/bra_legacy.py, auto_pad=True): the
# input is zero-padded before the projections, regions are ceil(H / n_win) tokens high, padded
# tokens take part in region means, as keys and in the LCE. "nchw" (official ops/bra_nchw.py): q, k,
# v are zero-padded after the projections, regions are floor(H / n_win) high (so there can be more
# than n_win per side), region means cover valid tokens only, padded keys stay in the softmax with
# logit 0 and value 0, the LCE sees the unpadded V map. "masked" (effnn's own, not in either official
# version): the "legacy" grid, "nchw" zero padding after the projections, and padded keys masked out
# of the softmax, regions without valid tokens never routed to.
PADDING_MODES = ("none", "legacy", "nchw", "masked")

# The KV downsampling modes of ops/bra_legacy.py; its "fracpool" and "conv" raise
# NotImplementedError there and are refused here too.
KV_DOWNSAMPLE_MODES = ("identity", "ada_avgpool", "ada_maxpool", "avgpool", "maxpool")


class RegionGrid(NamedTuple):
    """``grid_h x grid_w`` regions of ``region_h x region_w`` tokens."""

    grid_h: int
    grid_w: int
    region_h: int
    region_w: int

    @property
    def num_regions(self) -> int:
        return self.grid_h * self.grid_w

    @property
    def region_tokens(self) -> int:
        return self.region_h * self.region_w

    @property
    def padded_size(self) -> tuple[int, int]:
        return self.grid_h * self.region_h, self.grid_w * self.region_w


class Routing(NamedTuple):
    """What ``return_routing=True`` returns beside the output.

    ``indices`` (N, P, topk) int64: the regions each query region attends to, by descending
    region affinity; ``weights`` (N, P, topk) float32: the softmax of their affinities (used only
    with ``soft_routing``); ``grid``: the regions' layout on the (padded) map; ``input_size``: the
    (H, W) of the layer's input.
    """

    indices: Tensor
    weights: Tensor
    grid: RegionGrid
    input_size: tuple[int, int]


def padding_mode(auto_pad: bool | str) -> str:
    """The padding mode named by an ``auto_pad`` argument: False -> "none", True -> "legacy"
    (the official meaning of ``auto_pad=True``), or one of :data:`PADDING_MODES`."""
    if auto_pad is False:
        return "none"
    if auto_pad is True:
        return "legacy"
    if isinstance(auto_pad, str) and auto_pad in PADDING_MODES:
        return auto_pad
    raise ValueError(
        f"auto_pad must be False, True or one of {PADDING_MODES}, got {auto_pad!r}"
    )


def region_grid(height: int, width: int, n_win: int, auto_pad: bool | str = False) -> RegionGrid:
    """The region layout BRA uses on an ``height x width`` map (see :data:`PADDING_MODES`)."""
    mode = padding_mode(auto_pad)
    if height < 1 or width < 1:
        raise ValueError(f"the feature map must be at least 1x1, got {height}x{width}")
    if mode == "none":
        if height % n_win or width % n_win:
            raise ValueError(
                f"H={height} and W={width} must be divisible by n_win={n_win} (or pass "
                "auto_pad=True for the official padding, or auto_pad='masked')"
            )
        return RegionGrid(n_win, n_win, height // n_win, width // n_win)
    if mode == "nchw":
        if height < n_win or width < n_win:
            raise ValueError(
                f"auto_pad='nchw' needs H and W of at least n_win={n_win} (its regions are "
                f"floor(H / n_win) tokens high), got {height}x{width}"
            )
        rh, rw = height // n_win, width // n_win
        return RegionGrid(-(-height // rh), -(-width // rw), rh, rw)
    rh, rw = -(-height // n_win), -(-width // n_win)  # "legacy" and "masked": n_win x n_win regions
    return RegionGrid(n_win, n_win, rh, rw)


def _to_regions(x: Tensor, grid: RegionGrid) -> Tensor:
    """(N, Hp, Wp, C) on the padded map -> region-major (N, P, T, C) (a copy)."""
    N, C = x.shape[0], x.shape[-1]
    gh, gw, rh, rw = grid
    x = x.view(N, gh, rh, gw, rw, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(N, gh * gw, rh * rw, C)


def _regions_as_image(x: Tensor, grid: RegionGrid) -> Tensor:
    """Region-major (N, P, T, C) -> a strided (N, gh, rh, gw, rw, C) view in image order."""
    N, C = x.shape[0], x.shape[-1]
    gh, gw, rh, rw = grid
    return x.view(N, gh, gw, rh, rw, C).permute(0, 1, 3, 2, 4, 5)


def _token_valid(grid: RegionGrid, height: int, width: int, device: torch.device) -> Tensor:
    """(P, T) bool: which tokens of each region lie inside the unpadded ``height x width`` map."""
    gh, gw, rh, rw = grid
    rows = torch.arange(gh * rh, device=device) < height
    cols = torch.arange(gw * rw, device=device) < width
    valid = rows.view(gh, rh, 1, 1) & cols.view(1, 1, gw, rw)
    return valid.permute(0, 2, 1, 3).reshape(gh * gw, rh * rw)


# --------------------------------------------------------------------------------------------
# Level 1: region-to-region routing
# --------------------------------------------------------------------------------------------


def region_means(x: Tensor, counts: Tensor | None = None) -> Tensor:
    """Region-level features: the mean of each region's tokens, in float32 (float64 stays).

    ``x`` is region-major (N, P, T, C); returns (N, P, C). With ``counts`` (P,) the sum over each
    region's tokens is divided by ``counts[p]`` instead of T -- the mean over a region's valid
    tokens when its padded tokens are zero; a region with count 0 gets 0.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    if counts is None:
        return x.mean(2, dtype=dtype)
    return x.sum(2, dtype=dtype) / counts.clamp_min(1).to(dtype).unsqueeze(-1)


def bra_routing(
    q_region: Tensor,
    k_region: Tensor,
    topk: int,
    scale: float,
    *,
    diff_routing: bool = False,
    emb_weight: Tensor | None = None,
    emb_bias: Tensor | None = None,
    region_valid: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Region-to-region routing of the official ``TopkRouting``: returns ``(r_idx, r_weight)``.

    ``q_region``, ``k_region``: (N, P, C_qk) region-level queries and keys (:func:`region_means`).
    Unless ``diff_routing`` they are detached, so no gradient reaches the projections through the
    routing. ``emb_weight``/``emb_bias`` (C_qk, C_qk)/(C_qk,): the shared linear ``router.emb`` of
    ``param_routing``, applied to both. ``region_valid`` (P,) bool: regions that may be routed to
    (the others get logit -inf). The affinity ``(q_r * scale) @ k_r^T`` (N, P, P), its ``torch.topk``
    and the softmax run in float32 (float64 stays): ``r_idx`` (N, P, topk) int64 in descending
    affinity, ``r_weight`` (N, P, topk) float32 = softmax of the selected logits. One graph for all
    heads.
    """
    if not diff_routing:
        q_region, k_region = q_region.detach(), k_region.detach()
    dtype = torch.promote_types(q_region.dtype, torch.float32)
    q_region, k_region = q_region.to(dtype), k_region.to(dtype)
    if emb_weight is not None:
        bias = None if emb_bias is None else emb_bias.to(dtype)
        q_region = F.linear(q_region, emb_weight.to(dtype), bias)
        k_region = F.linear(k_region, emb_weight.to(dtype), bias)
    logits = torch.matmul(q_region * scale, k_region.transpose(-1, -2))
    if region_valid is not None:
        logits = logits.masked_fill(~region_valid, float("-inf"))
    top_logits, r_idx = torch.topk(logits, topk, dim=-1)
    return r_idx, torch.softmax(top_logits, dim=-1)


# --------------------------------------------------------------------------------------------
# Level 2: token-to-token attention over the routed regions. Reference path.
# --------------------------------------------------------------------------------------------

# The reference attends in one of two ways. "gathered": the k routed regions' keys and values are
# copied next to each query region (index_select) and attention runs per query region over its
# k * Tk keys. "masked full": attention runs over the whole map per image, with an additive bias
# that is log(number of times a region was routed to) -- 0 for routed regions, -inf for the others
# (so repeated indices weigh as they do when gathered). The second form moves no keys but computes
# (P - k) / k times more logits; it pays when the regions are small and a large share of them is
# routed (BiFormer's third stage at 224x224: 2x2-token regions, 16 of 49 routed, where a gathered
# copy is 16x the keys). A gathered value costs about as much time as _GATHER_COST_MACS
# multiply-adds on a CPU (its copy, the copy again in the backward and its index_add), so the masked
# form runs when its extra multiply-adds per query region, Tq * (P - k) * Tk * (C_qk + C_v), are
# below that cost of the gathered keys and values, k * Tk * (C_qk + C_v) values. Soft routing
# scales keys and values per (query region, routed region) pair, which a bias cannot express, so it
# always gathers.
_GATHER_COST_MACS = 32

_FLASH_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _masked_full(num_regions: int, topk: int, q_tokens: int, soft: bool) -> bool:
    return not soft and q_tokens * (num_regions - topk) <= _GATHER_COST_MACS * topk


def _use_cpu_flash(q: Tensor, k: Tensor, v: Tensor) -> bool:
    # PyTorch's fused CPU flash-attention (forward and backward, with the log-sum-exp) needs one
    # head size for q, k and v. float64 takes the explicit path: the fused backward is wrong for
    # float64 with a broadcast mask in torch 2.14.
    return (
        q.device.type == "cpu"
        and q.dtype in _FLASH_CPU_DTYPES
        and q.shape[-1] == k.shape[-1] == v.shape[-1]
    )


def _attend(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float):
    """softmax(q k^T * scale + bias) v for (B, H, L, E) q and (B, H, S, E) k, v; returns
    (out, lse) with lse (B, H, L) in float32 (float64 stays)."""
    if _use_cpu_flash(q, k, v):
        bias = None if bias is None else bias.to(q.dtype)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=bias, scale=scale
        )
    dtype = torch.promote_types(q.dtype, torch.float32)
    s = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)).mul_(scale)
    if bias is not None:
        s = s.add_(bias.to(dtype))
    lse = torch.logsumexp(s, dim=-1)
    p = s.sub_(lse.unsqueeze(-1)).exp_()
    return torch.matmul(p, v.to(dtype)).to(q.dtype), lse


def _attend_backward(
    grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    bias: Tensor | None, scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    if _use_cpu_flash(q, k, v):
        bias = None if bias is None else bias.to(q.dtype)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad, q, k, v, out, lse, 0.0, False, attn_mask=bias, scale=scale
        )
    dtype = lse.dtype
    q, k, v, grad = q.to(dtype), k.to(dtype), v.to(dtype), grad.to(dtype)
    s = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
    if bias is not None:
        s = s.add_(bias.to(dtype))
    p = s.sub_(lse.unsqueeze(-1)).exp_()
    dv = torch.matmul(p.transpose(-1, -2), grad)
    dp = torch.matmul(grad, v.transpose(-1, -2))
    delta = (grad * out.to(dtype)).sum(-1, keepdim=True)
    ds = dp.sub_(delta).mul_(p).mul_(scale)
    dq = torch.matmul(ds, k)
    dk = torch.matmul(ds.transpose(-1, -2), q)
    return dq, dk, dv


def _heads(x: Tensor, num_heads: int) -> Tensor:
    """(B, L, C) -> a (B, heads, L, C / heads) view."""
    B, L, C = x.shape
    return x.view(B, L, num_heads, C // num_heads).transpose(1, 2)


def _merge_heads(x: Tensor, shape: tuple[int, ...]) -> Tensor:
    """(B, heads, L, E) -> ``shape`` = (..., L', heads * E), free when x is (B, L, heads, E) in
    memory (what the fused kernels return)."""
    return x.transpose(1, 2).reshape(shape)


def _flat_index(r_idx: Tensor) -> Tensor:
    """Routed region indices into the flattened (N * P) region axis, (N * P * topk,)."""
    N, P, _ = r_idx.shape
    offsets = torch.arange(N, device=r_idx.device).mul_(P).view(N, 1, 1)
    return (r_idx + offsets).reshape(-1)


def _gather(x: Tensor, flat: Tensor, topk: int) -> Tensor:
    """Region-major (N, P, T, C) -> the routed regions' tokens per query region (N*P, topk*T, C)."""
    N, P, T, C = x.shape
    return x.reshape(N * P, T, C).index_select(0, flat).view(N * P, topk * T, C)


def _side_by_side(k: Tensor, v: Tensor) -> Tensor | None:
    """k and v as one (N, P, Tk, C_qk + C_v) view when v's channels directly follow k's in one
    buffer (the layer's fused projection), else None."""
    if (
        k.dtype != v.dtype
        or k.stride() != v.stride()
        or k.stride(-1) != 1
        or k.untyped_storage().data_ptr() != v.untyped_storage().data_ptr()
        or v.data_ptr() != k.data_ptr() + k.shape[-1] * k.element_size()
    ):
        return None
    return k.as_strided((*k.shape[:3], k.shape[3] + v.shape[3]), k.stride())


def _gather_kv(k: Tensor, v: Tensor, flat: Tensor, topk: int) -> tuple[Tensor, Tensor]:
    """:func:`_gather` of k and v; one copy (whose channel slices are returned) when they lie side
    by side in memory: one pass over the routed rows instead of two."""
    kv = _side_by_side(k, v)
    if kv is None:
        return _gather(k, flat, topk), _gather(v, flat, topk)
    kv = _gather(kv, flat, topk)
    return kv[..., : k.shape[-1]], kv[..., k.shape[-1]:]


def _scatter_add(grad: Tensor, flat: Tensor, like: Tensor) -> Tensor:
    """The backward of :func:`_gather`: (N*P, topk*T, C) -> (N, P, T, C) summed per region."""
    N, P, T, C = like.shape
    out = torch.zeros(N * P, T, C, dtype=like.dtype, device=like.device)
    return out.index_add_(0, flat, grad.reshape(-1, T, C).to(like.dtype)).view(N, P, T, C)


def _gathered_bias(key_valid: Tensor | None, r_idx: Tensor) -> Tensor | None:
    """Additive key bias of the gathered form, (N*P, 1, 1, topk*Tk): -inf on padded keys."""
    if key_valid is None:
        return None
    N, P, topk = r_idx.shape
    keep = key_valid[r_idx].view(N * P, 1, 1, -1)
    return torch.zeros(keep.shape, device=keep.device).masked_fill_(~keep, float("-inf"))


def _full_bias(r_idx: Tensor, key_valid: Tensor | None, q_tokens: int, k_tokens: int) -> Tensor:
    """Additive bias of the masked full form, (N, 1, P*Tq, P*Tk): log(times routed)."""
    N, P, topk = r_idx.shape
    counts = torch.zeros(N, P, P, device=r_idx.device)
    counts.scatter_add_(2, r_idx, torch.ones(r_idx.shape, device=r_idx.device))
    bias = counts.log_().view(N, 1, P, 1, P, 1).expand(N, 1, P, q_tokens, P, k_tokens)
    bias = bias.reshape(N, 1, P * q_tokens, P * k_tokens)
    if key_valid is not None:
        bias = bias.masked_fill(~key_valid.view(1, 1, 1, P * k_tokens), float("-inf"))
    return bias


def _weighted(x: Tensor, r_weight: Tensor, topk: int) -> Tensor:
    """Gathered (N*P, topk*T, C) times the routing weight of each routed region."""
    NP, _, C = x.shape
    w = r_weight.reshape(NP, topk, 1, 1).to(x.dtype)
    return (x.view(NP, topk, -1, C) * w).view(NP, -1, C)


def routed_attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    r_idx: Tensor,
    r_weight: Tensor | None,
    key_valid: Tensor | None,
    num_heads: int,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Reference forward of :func:`routed_attention`: returns ``(out, lse)``.

    ``out`` (N, P, Tq, C_v) contiguous; ``lse`` (N, P, heads, Tq), float32 (float64 for float64
    input): the log-sum-exp of each query's scaled, biased logits over its routed keys, which the
    backward uses to rebuild the attention weights.
    """
    N, P, Tq, Cqk = q.shape
    Tk, Cv = v.shape[2], v.shape[3]
    topk = r_idx.shape[-1]
    if _masked_full(P, topk, Tq, r_weight is not None):
        bias = _full_bias(r_idx, key_valid, Tq, Tk)
        out, lse = _attend(
            _heads(q.reshape(N, P * Tq, Cqk), num_heads),
            _heads(k.reshape(N, P * Tk, Cqk), num_heads),
            _heads(v.reshape(N, P * Tk, Cv), num_heads),
            bias, scale,
        )
        lse = lse.view(N, num_heads, P, Tq).transpose(1, 2)
    else:
        flat = _flat_index(r_idx)
        ks, vs = _gather_kv(k, v, flat, topk)
        if r_weight is not None:
            ks, vs = _weighted(ks, r_weight, topk), _weighted(vs, r_weight, topk)
        out, lse = _attend(
            _heads(q.reshape(N * P, Tq, Cqk), num_heads), _heads(ks, num_heads),
            _heads(vs, num_heads), _gathered_bias(key_valid, r_idx), scale,
        )
        lse = lse.view(N, P, num_heads, Tq)
    return _merge_heads(out, (N, P, Tq, Cv)).contiguous(), lse.contiguous()


def routed_attention_backward_ref(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    r_idx: Tensor,
    r_weight: Tensor | None,
    key_valid: Tensor | None,
    num_heads: int,
    scale: float,
    need_weight_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Reference backward: ``(grad_q, grad_k, grad_v, grad_r_weight)``, the last one empty unless
    ``need_weight_grad``. The routed keys and values are gathered again (and released before the
    function returns); the gradients of the gathered copies are summed back per region with
    ``index_add``."""
    N, P, Tq, Cqk = q.shape
    Tk, Cv = v.shape[2], v.shape[3]
    topk = r_idx.shape[-1]
    m = num_heads
    no_weight_grad = q.new_empty(0)
    if _masked_full(P, topk, Tq, r_weight is not None):
        dq, dk, dv = _attend_backward(
            _heads(grad_out.reshape(N, P * Tq, Cv), m),
            _heads(q.reshape(N, P * Tq, Cqk), m),
            _heads(k.reshape(N, P * Tk, Cqk), m),
            _heads(v.reshape(N, P * Tk, Cv), m),
            _heads(out.reshape(N, P * Tq, Cv), m),
            lse.transpose(1, 2).reshape(N, m, P * Tq),
            _full_bias(r_idx, key_valid, Tq, Tk), scale,
        )
        return (
            _merge_heads(dq, q.shape).to(q.dtype).contiguous(),
            _merge_heads(dk, k.shape).to(k.dtype).contiguous(),
            _merge_heads(dv, v.shape).to(v.dtype).contiguous(),
            no_weight_grad,
        )
    flat = _flat_index(r_idx)
    ks_raw, vs_raw = _gather_kv(k, v, flat, topk)
    ks, vs = ks_raw, vs_raw
    if r_weight is not None:
        ks, vs = _weighted(ks_raw, r_weight, topk), _weighted(vs_raw, r_weight, topk)
    if not need_weight_grad:
        del ks_raw, vs_raw  # only the gradient of the routing weights needs the unweighted copies
    dq, dks, dvs = _attend_backward(
        _heads(grad_out.reshape(N * P, Tq, Cv), m),
        _heads(q.reshape(N * P, Tq, Cqk), m),
        _heads(ks, m),
        _heads(vs, m),
        _heads(out.reshape(N * P, Tq, Cv), m),
        lse.reshape(N * P, m, Tq),
        _gathered_bias(key_valid, r_idx), scale,
    )
    del ks, vs
    dks = _merge_heads(dks, (N * P, topk, Tk * Cqk))
    dvs = _merge_heads(dvs, (N * P, topk, Tk * Cv))
    grad_weight = no_weight_grad
    if need_weight_grad:
        dtype = torch.promote_types(q.dtype, torch.float32)
        grad_weight = (dks.to(dtype) * ks_raw.reshape(dks.shape)).sum(-1)
        grad_weight += (dvs.to(dtype) * vs_raw.reshape(dvs.shape)).sum(-1)
        grad_weight = grad_weight.view(N, P, topk).to(r_weight.dtype)
        del ks_raw, vs_raw
    if r_weight is not None:
        w = r_weight.reshape(N * P, topk, 1).to(dks.dtype)
        dks, dvs = dks * w, dvs * w
    dk = _scatter_add(dks, flat, k)
    del dks
    dv = _scatter_add(dvs, flat, v)
    return _merge_heads(dq, q.shape).to(q.dtype).contiguous(), dk, dv, grad_weight


# --------------------------------------------------------------------------------------------
# Registered ops: effnn::routed_attention (forward) and effnn::routed_attention_backward
# --------------------------------------------------------------------------------------------


def _triton_kernels():
    from effnn.kernels import routing_attention

    return routing_attention


def _forward(backend: str, q, k, v, r_idx, r_weight, key_valid, num_heads, scale):
    # every backend has the contract of routed_attention_ref
    if backend == "triton":
        return _triton_kernels().forward(q, k, v, r_idx, r_weight, key_valid, num_heads, scale)
    return routed_attention_ref(q, k, v, r_idx, r_weight, key_valid, num_heads, scale)


def _backward(backend: str, grad_out, q, k, v, out, lse, r_idx, r_weight, key_valid, num_heads,
              scale, need_weight_grad):
    if backend == "triton":
        return _triton_kernels().backward(
            grad_out, q, k, v, out, lse, r_idx, r_weight, key_valid, num_heads, scale,
            need_weight_grad,
        )
    return routed_attention_backward_ref(
        grad_out, q, k, v, out, lse, r_idx, r_weight, key_valid, num_heads, scale, need_weight_grad
    )


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


@torch.library.custom_op("effnn::routed_attention", mutates_args=())
def _routed_attention_op(
    q: Tensor, k: Tensor, v: Tensor, r_idx: Tensor, r_weight: Tensor | None,
    key_valid: Tensor | None, num_heads: int, scale: float, backend: str,
) -> tuple[Tensor, Tensor]:
    """Returns (out, lse); see :func:`routed_attention_ref`."""
    if q.shape[0] == 0:  # nothing to attend
        N, P, Tq, _ = q.shape
        return (q.new_zeros(0, P, Tq, v.shape[-1]),
                q.new_zeros((0, P, num_heads, Tq), dtype=_lse_dtype(q.dtype)))
    return _forward(backend, q, k, v, r_idx, r_weight, key_valid, num_heads, scale)


@_routed_attention_op.register_fake
def _(q, k, v, r_idx, r_weight, key_valid, num_heads, scale, backend):
    N, P, Tq, _ = q.shape
    out = q.new_empty((N, P, Tq, v.shape[-1]))
    return out, q.new_empty((N, P, num_heads, Tq), dtype=_lse_dtype(q.dtype))


@torch.library.custom_op("effnn::routed_attention_backward", mutates_args=())
def _routed_attention_backward_op(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, r_idx: Tensor,
    r_weight: Tensor | None, key_valid: Tensor | None, num_heads: int, scale: float,
    need_weight_grad: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if q.shape[0] == 0:
        grad_weight = torch.zeros_like(r_weight) if need_weight_grad else q.new_empty(0)
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), grad_weight
    return _backward(backend, grad_out, q, k, v, out, lse, r_idx, r_weight, key_valid, num_heads,
                     scale, need_weight_grad)


@_routed_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, r_idx, r_weight, key_valid, num_heads, scale, need_weight_grad,
      backend):
    grad_weight = r_weight.new_empty(r_weight.shape) if need_weight_grad else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), grad_weight


def _setup_context(ctx, inputs, output):
    q, k, v, r_idx, r_weight, key_valid, num_heads, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, r_idx, r_weight, key_valid)
    ctx.mark_non_differentiable(lse)
    ctx.num_heads, ctx.scale, ctx.backend = num_heads, scale, backend


def _autograd_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, r_idx, r_weight, key_valid = ctx.saved_tensors
    need_q, need_k, need_v, _, need_weight = ctx.needs_input_grad[:5]
    if not (need_q or need_k or need_v or need_weight):
        return (None,) * 9
    dq, dk, dv, dw = torch.ops.effnn.routed_attention_backward(
        grad_out.contiguous(), q, k, v, out, lse, r_idx, r_weight, key_valid, ctx.num_heads,
        ctx.scale, bool(need_weight), ctx.backend,
    )
    return (
        dq if need_q else None,
        dk if need_k else None,
        dv if need_v else None,
        None,
        dw if need_weight else None,
        None, None, None, None,
    )


_routed_attention_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def _forward_macs(q_shape, k_shape, v_shape, idx_shape, *_) -> int:
    # logits (C_qk) and weighted values (C_v) of every query against its topk * Tk routed keys
    N, P, Tq, Cqk = q_shape
    return N * P * Tq * idx_shape[-1] * k_shape[2] * (Cqk + v_shape[-1])


def _backward_macs(grad_shape, q_shape, k_shape, v_shape, out_shape, lse_shape, idx_shape, *_) -> int:
    # gradients of the logits, the queries, the keys and the values: twice the forward
    return 2 * _forward_macs(q_shape, k_shape, v_shape, idx_shape)


register_macs(torch.ops.effnn.routed_attention, _forward_macs)
register_macs(torch.ops.effnn.routed_attention_backward, _backward_macs)


# --------------------------------------------------------------------------------------------
# Public entry point of level 2: validation, autocast, dispatch
# --------------------------------------------------------------------------------------------

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _triton_reasons(q: Tensor, k: Tensor, v: Tensor, num_heads: int) -> list[str]:
    reasons = triton_device_reasons(q.device)
    return reasons or _triton_kernels().unsupported_reasons(q, k, v, num_heads)


def choose_backend(q: Tensor, k: Tensor, v: Tensor, num_heads: int, backend: str = "auto") -> str:
    """The backend :func:`routed_attention` runs for these inputs (raises BackendError if
    ``backend`` is forced and cannot serve them)."""
    return select_backend(
        "routed_attention", backend, q.device,
        {"ref": lambda: [], "triton": lambda: _triton_reasons(q, k, v, num_heads)},
    )


def _check_routed_inputs(q, k, v, r_idx, r_weight, key_valid, num_heads, scale) -> None:
    op = "routed_attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        if t.dtype != q.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but q has dtype {q.dtype}")
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be 4-D region-major (N, P, T, C), got shape {tuple(t.shape)}")
    if not isinstance(r_idx, Tensor) or r_idx.dtype != torch.int64:
        got = r_idx.dtype if isinstance(r_idx, Tensor) else type(r_idx).__name__
        raise TypeError(f"{op}: r_idx must be an int64 Tensor, got {got}")
    N, P, Tq, Cqk = q.shape
    if k.shape[:2] != (N, P) or k.shape[3] != Cqk:
        raise ValueError(f"{op}: k must have shape ({N}, {P}, Tk, {Cqk}) like q, got {tuple(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"{op}: v must have shape ({N}, {P}, {k.shape[2]}, C_v) like k, got {tuple(v.shape)}")
    if k.shape[2] < 1:  # an empty softmax: CPU flash attention dies of SIGFPE on it
        raise ValueError(f"{op}: k and v need at least one token per region (Tk >= 1), got Tk={k.shape[2]}")
    if r_idx.dim() != 3 or r_idx.shape[:2] != (N, P) or r_idx.shape[2] < 1:
        raise ValueError(f"{op}: r_idx must have shape ({N}, {P}, topk) with topk >= 1, got {tuple(r_idx.shape)}")
    if r_weight is not None:
        if not isinstance(r_weight, Tensor) or r_weight.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{op}: r_weight must be a floating-point Tensor or None")
        if r_weight.shape != r_idx.shape:
            raise ValueError(f"{op}: r_weight must have the shape of r_idx {tuple(r_idx.shape)}, got {tuple(r_weight.shape)}")
    if key_valid is not None:
        if not isinstance(key_valid, Tensor) or key_valid.dtype != torch.bool:
            raise TypeError(f"{op}: key_valid must be a bool Tensor or None")
        if key_valid.shape != (P, k.shape[2]):
            raise ValueError(f"{op}: key_valid must have shape ({P}, {k.shape[2]}), got {tuple(key_valid.shape)}")
    for name, t in (("k", k), ("v", v), ("r_idx", r_idx), ("r_weight", r_weight), ("key_valid", key_valid)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{op}: {name} is on {t.device} but q is on {q.device}; all tensors must be on one device")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"{op}: num_heads must be a positive int, got {num_heads!r}")
    if Cqk % num_heads or v.shape[3] % num_heads:
        raise ValueError(
            f"{op}: the channels of q/k ({Cqk}) and v ({v.shape[3]}) must be divisible by "
            f"num_heads={num_heads}"
        )
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be a finite number, got {scale!r}")


def routed_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    r_idx: Tensor,
    r_weight: Tensor | None = None,
    key_valid: Tensor | None = None,
    *,
    num_heads: int,
    scale: float,
    backend: str = "auto",
) -> Tensor:
    """Token-to-token attention over routed regions (level 2 of BRA).

    Args:
        q: (N, P, Tq, C_qk) region-major queries, head-major channels.
        k: (N, P, Tk, C_qk) region-major keys; v: (N, P, Tk, C_v) values.
        r_idx: (N, P, topk) int64, the regions (0 <= r_idx < P) query region p attends to;
            a repeated index counts its keys as many times.
        r_weight: optional (N, P, topk): the keys and values of routed region j are multiplied by
            ``r_weight[..., j]`` (the official ``soft_routing``); differentiable.
        key_valid: optional (P, Tk) bool, False for keys excluded from the softmax (padding). Every
            query must keep at least one key.
        num_heads: heads; C_qk and C_v are split head-major.
        scale: multiplies the logits (BiFormer: qk_dim ** -0.5, the full width).
        backend: "auto", "ref" or "triton" (``effnn.kernels.routing_attention``; CUDA tensors,
            or CPU tensors under ``TRITON_INTERPRET=1``) (see :mod:`effnn.ops._dispatch`).

    Returns (N, P, Tq, C_v): for each head h,
    ``out[n, p, t, h] = softmax_j,s(scale * q[n, p, t, h] . k~[n, r_idx[n, p, j], s, h]) v~[...]``
    over all topk * Tk routed keys at once, with k~ = w k, v~ = w v under ``r_weight``.
    Under ``torch.autocast`` q, k and v are cast to the autocast dtype.
    """
    if isinstance(q, Tensor) and q.device.type != "meta" and torch.is_autocast_enabled(q.device.type):
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = (t.to(dtype) if isinstance(t, Tensor) else t for t in (q, k, v))
    _check_routed_inputs(q, k, v, r_idx, r_weight, key_valid, num_heads, scale)
    chosen = choose_backend(q, k, v, num_heads, backend)
    out, _ = torch.ops.effnn.routed_attention(
        q, k, v, r_idx, r_weight, key_valid, num_heads, float(scale), chosen
    )
    return out


# --------------------------------------------------------------------------------------------
# The whole layer
# --------------------------------------------------------------------------------------------


def _downsample_kv(x: Tensor, grid: RegionGrid, mode: str, kv_per_win: int, ratio: int) -> Tensor:
    """Per-region pooling of region-major keys or values, as the official ``kv_down``."""
    if mode == "identity" or (mode in ("avgpool", "maxpool") and ratio <= 1):
        return x
    N, P, _, C = x.shape
    rh, rw = grid.region_h, grid.region_w
    if mode in ("avgpool", "maxpool") and (rh < ratio or rw < ratio):
        raise ValueError(
            f"kv_downsample_mode={mode!r}: regions of {rh}x{rw} tokens are smaller than "
            f"kv_downsample_ratio={ratio}"
        )
    t = x.reshape(N * P, rh, rw, C).permute(0, 3, 1, 2)
    if mode == "ada_avgpool":
        t = F.adaptive_avg_pool2d(t, kv_per_win)
    elif mode == "ada_maxpool":
        t = F.adaptive_max_pool2d(t, kv_per_win)
    elif mode == "avgpool":
        t = F.avg_pool2d(t, ratio)
    else:
        t = F.max_pool2d(t, ratio)
    return t.permute(0, 2, 3, 1).reshape(N, P, -1, C)


def bi_level_routing_attention(
    x: Tensor,
    qkv_weight: Tensor,
    qkv_bias: Tensor | None,
    wo_weight: Tensor | None,
    wo_bias: Tensor | None,
    lepe_weight: Tensor | None,
    lepe_bias: Tensor | None,
    *,
    num_heads: int,
    n_win: int,
    qk_dim: int,
    topk: int,
    scale: float,
    router_weight: Tensor | None = None,
    router_bias: Tensor | None = None,
    diff_routing: bool = False,
    soft_routing: bool = False,
    auto_pad: bool | str = False,
    kv_downsample_mode: str = "identity",
    kv_per_win: int = 4,
    kv_downsample_ratio: int = 4,
    backend: str = "auto",
    return_routing: bool = False,
) -> Tensor | tuple[Tensor, Routing]:
    """The BRA layer on channels-last ``x`` (N, H, W, C); returns (N, H, W, C) (and a
    :class:`Routing` with ``return_routing``).

    Parameters in the official layout: ``qkv_weight`` (2*qk_dim + C, C) with rows q | k | v,
    ``wo_weight`` (C, C) or None (``param_attention="qkv"``), ``lepe_weight`` (C, 1, K, K) or None
    (``side_dwconv <= 0``), ``router_weight`` (qk_dim, qk_dim) or None (``param_routing``). Steps:
    pad (``auto_pad``, :data:`PADDING_MODES`), cut into regions, project, route on the region
    means (:func:`bra_routing`), pool K/V per region (``kv_downsample_mode``), attend
    (:func:`routed_attention`), add the local context enhancement (depthwise conv of the
    full-resolution V map), project with ``wo``, crop.
    """
    mode = padding_mode(auto_pad)
    N, H, W, C = x.shape
    grid = region_grid(H, W, n_win, mode)
    if not 1 <= topk <= grid.num_regions:
        raise ValueError(
            f"topk={topk} must be between 1 and the number of regions, {grid.num_regions} "
            f"({grid.grid_h}x{grid.grid_w}) for a {H}x{W} input"
        )
    Hp, Wp = grid.padded_size
    padded = (Hp, Wp) != (H, W)
    if padded:
        x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))  # zeros at the bottom and right
    xr = _to_regions(x, grid)  # (N, P, T, C): the official region partition, before the projection
    del x  # intermediates go as soon as they are used: inference keeps few maps alive

    counts = key_valid = region_valid = keep = None
    if padded and mode in ("nchw", "masked"):  # zero padding after the projections
        valid = _token_valid(grid, H, W, xr.device)
        keep = valid.unsqueeze(-1).to(xr.dtype)
        counts = valid.sum(-1)
        if mode == "masked":
            key_valid, region_valid = valid, counts > 0

    # One matmul for q, k and v, as the official fused ``qkv``: q, k and v are channel slices of
    # its output, so the routed attention gathers k and v together (one ``index_select``) and
    # autograd joins their gradients with one ``cat`` and one matmul for the input's gradient.
    qkv = F.linear(xr, qkv_weight, qkv_bias)
    del xr
    if keep is not None:
        qkv = qkv * keep
    q, k, v = qkv.split((qk_dim, qk_dim, qkv.shape[-1] - 2 * qk_dim), dim=-1)
    q_region, k_region = region_means(qkv[..., : 2 * qk_dim], counts).split(qk_dim, dim=-1)
    del qkv

    r_idx, r_weight = bra_routing(
        q_region, k_region, topk, scale, diff_routing=diff_routing, emb_weight=router_weight,
        emb_bias=router_bias, region_valid=region_valid,
    )
    k_att = _downsample_kv(k, grid, kv_downsample_mode, kv_per_win, kv_downsample_ratio)
    v_att = _downsample_kv(v, grid, kv_downsample_mode, kv_per_win, kv_downsample_ratio)
    out = routed_attention(
        q, k_att, v_att, r_idx, r_weight if soft_routing else None, key_valid,
        num_heads=num_heads, scale=scale, backend=backend,
    )
    del q, k, k_att, v_att

    out_image = _regions_as_image(out, grid)  # (N, gh, rh, gw, rw, C) view
    if lepe_weight is not None:
        # LCE: depthwise conv over the full-resolution V map, crossing region borders
        v_map = _regions_as_image(v, grid).reshape(N, Hp, Wp, C)
        del v
        lepe = F.conv2d(v_map.permute(0, 3, 1, 2), lepe_weight, lepe_bias,
                        padding=lepe_weight.shape[-1] // 2, groups=C).permute(0, 2, 3, 1)
        del v_map
        y = lepe.reshape(out_image.shape) + out_image
        del lepe
    else:
        y = out_image.contiguous()
    del out, out_image
    y = y.reshape(N, Hp, Wp, C)
    if wo_weight is not None:
        y = F.linear(y, wo_weight, wo_bias)
    if padded:
        y = y[:, :H, :W].contiguous()
    if return_routing:
        return y, Routing(r_idx, r_weight, grid, (H, W))
    return y
