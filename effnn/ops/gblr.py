"""Generalized block-low-rank (GBLR) matrices with Gaussian-Dirichlet ("Gaudi") masks (Lee & Kim,
"Differentiable Learning of Generalized Structured Matrices for Efficient Deep Neural Networks",
ICLR 2024), in the layout of the official implementation (changwoolee/Gaudi-GBLR,
``src/models/layers/gblr.py``, ``GaudiGBLR``).

A GBLR weight is a sum of K rank-r blocks, each confined to a cyclic interval of rows and one of
columns::

    W = sum_k diag(mask_out[k]) @ lr_weight2[k] @ lr_weight1[k] @ diag(mask_in[k])

with ``lr_weight1`` (K, r, in_features), ``lr_weight2`` (K, out_features, r). The mask of a width
``w`` and location ``l`` (fractions of the length n; ``widths``/``locations`` hold (in, out) rows)
is the Gaudi mask, defined in the frequency domain for f = 0 .. n//2::

    M[f] = w * sinc(f w) / sinc(f / n) * exp(-f^2 / (2 sigma^2)) * exp(-i pi f (2 l + w - 1/n))
    mask = irfft(M, n, norm="forward")

The first factor is the Dirichlet kernel, i.e. the spectrum of the boxcar of length w*n starting
at l*n (cyclic); the Gaussian smooths it (sigma = inf: the exact boxcar). Widths and locations are
rounded to multiples of 1/n in the forward pass with straight-through gradients; in eval mode
widths of at most one element are dropped and mask entries below 1e-3 in magnitude are zeroed
(the official ``get_width``/``get_mask``). Because the rounded spectrum is exactly a boxcar's
times the Gaussian, the masks are computed in space (a running sum of the periodic Gaussian,
O(K n), no transform per component) with closed-form gradients; both equal the official
frequency-domain formula and its autograd (tests/ops/test_gblr_op.py).

This file holds the mask (``gaudi_mask_ref``, the registered ops ``effnn::gaudi_mask`` and
``effnn::gaudi_mask_backward``), the dense product of a layer in training
(``gblr_masked_linear``), the compact structured product used for inference
(``gblr_structured``: gather the columns of a group of blocks, a small product, add into its
rows; ``effnn::gblr_structured``, reference backend) with its packing (``pack_structure``), and
the initialisation from a dense weight under a budget (``gblr_project``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from effnn.flops import register_macs
from effnn.ops._dispatch import select_backend, triton_device_reasons

__all__ = [
    "EVAL_MASK_THRESHOLD",
    "GBLRPacked",
    "gaudi_mask",
    "gaudi_mask_ref",
    "gblr_masked_linear",
    "gblr_dense_weight",
    "gblr_project",
    "gblr_structured",
    "gblr_structured_ref",
    "mask_intervals",
    "pack_structure",
    "gaudi_mask_backward_ref",
]

EVAL_MASK_THRESHOLD = 1e-3
"""Eval-mode mask entries with a smaller magnitude are zeroed (official ``get_mask``)."""

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------------------------
# The Gaudi mask
# --------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # masks are computed in float32, or float64 for float64 widths
    return torch.float64 if dtype == torch.float64 else torch.float32


def _lengths_starts(widths: Tensor, locations: Tensor, n: int, hard: bool) -> tuple[Tensor, Tensor]:
    """Integer lengths L = round(w n) and starts s = round(l n) (int64): the official STE rounding
    (``get_width``, ``get_mask``). ``hard``: the eval-mode ``F.hardshrink(w, 1/n)`` of the rounded
    width, which drops a block of one element (|L| <= 1). The product is rounded in the widths'
    own precision, as the official code does: float32 and float64 disagree near .5 (w =
    0.5462239384651184, n = 768 gives 420 in float32, 419 in float64)."""
    dt = _compute_dtype(widths.dtype)
    length = torch.round(widths.detach().to(dt) * n).to(torch.int64)
    if hard:
        length = torch.where(length.abs() > 1, length, torch.zeros_like(length))
    return length, torch.round(locations.detach().to(dt) * n).to(torch.int64)


def _gaussian_kernel(sigma: Tensor, n: int, dtype: torch.dtype) -> Tensor:
    """g = irfft(exp(-f^2 / (2 sigma^2))) (n,), the periodic Gaussian the boxcar is smoothed
    with; exactly the unit impulse at sigma = inf (no Gaussian)."""
    sigma = sigma.to(dtype)
    if bool(torch.isinf(sigma)):
        g = torch.zeros(n, dtype=dtype, device=sigma.device)
        g[0] = 1.0
        return g
    freq = torch.arange(n // 2 + 1, dtype=dtype, device=sigma.device)
    return torch.fft.irfft(torch.exp(-0.5 * freq.square() / sigma.square()), n=n)


def _edge_kernel(sigma: Tensor, n: int, dtype: torch.dtype) -> Tensor:
    """h = irfft(G[f] e^{i pi f / n} / sinc(f / n), norm="forward") (n,): a block's mask moves by
    h[i - edge] when its end edge moves (d mask / d w), see :func:`gaudi_mask_backward_ref`."""
    freq = torch.arange(n // 2 + 1, dtype=dtype, device=sigma.device)
    sig = sigma.to(dtype)
    gauss = torch.ones_like(freq) if bool(torch.isinf(sig)) else torch.exp(-0.5 * freq.square() / sig.square())
    amp = gauss / torch.sinc(freq / n)
    phase = freq * (math.pi / n)
    return torch.fft.irfft(torch.complex(amp * torch.cos(phase), amp * torch.sin(phase)), n=n, norm="forward")


def _windows(table: Tensor, starts: Tensor, n: int) -> Tensor:
    """Rows table[starts[k] : starts[k] + n] (K, n): one gather of contiguous windows."""
    return table.unfold(0, n, 1).index_select(0, starts)


def _periodic_windows(kernel: Tensor, shifts: Tensor) -> Tensor:
    """Rows kernel[(i - shifts[k]) mod n] (K, n) of a periodic kernel (n,)."""
    n = kernel.shape[0]
    return _windows(torch.cat([kernel, kernel]), torch.remainder(-shifts, n), n)


def gaudi_mask_ref(
    widths: Tensor, locations: Tensor, sigma: Tensor, n: int, hard: bool = False
) -> Tensor:
    """Gaudi masks (K, n) of K components of a dimension of length ``n`` (the specification).

    ``widths``, ``locations``: (K,) fractions of n, rounded to lengths L = round(w n) and starts
    s = round(l n) (straight-through in the backward); ``sigma``: 0-d, the Gaussian's width in
    frequency (``inf``: no Gaussian); ``hard``: the official eval-mode thresholds (|L| <= 1
    dropped, |mask| < 1e-3 zeroed). The result is in float32, or float64 for float64 widths.

    The official mask is irfft(M, norm="forward") with M[f] = w sinc(f w) / sinc(f/n) G[f]
    exp(-i pi f (2 l + w - 1/n)) (f = 0..n//2, G the Gaussian). At integer L and s, M is exactly
    the 1/n-normalised DFT of the cyclic boxcar 1[s <= i < s + L] (the Dirichlet kernel) times G,
    so the mask is the boxcar convolved with g = irfft(G): a difference of two values of the
    running sum C of g, computed here without a transform per component::

        mask[k, i] = C(i - s_k + 1) - C(i - s_k + 1 - L_k),
        C(t) = floor(t / n) * sum(g) + (g[0] + ... + g[(t mod n) - 1])

    for any integer L (negative and wrapping ones included, as the closed form); both terms are
    contiguous windows of a table of C. Cost O(K n).
    """
    dtype = _compute_dtype(widths.dtype)
    length, start = _lengths_starts(widths, locations, n, hard)
    start = torch.remainder(start, n)  # the mask is n-periodic in s
    g = _gaussian_kernel(sigma, n, dtype)
    # C(t) for t in [lo, hi]: the smallest argument is 2 - n - max(L, 0), the largest n - min(L, 0)
    lo = 2 - n - max(int(length.max()), 0) if length.numel() else 2 - n
    hi = n - min(int(length.min()), 0) if length.numel() else n
    t = torch.arange(lo, hi + 1, device=widths.device)
    cycles, rem = torch.div(t, n, rounding_mode="floor"), torch.remainder(t, n)
    prefix = torch.cat([g.new_zeros(1), torch.cumsum(g, 0)])  # prefix[j] = g[0] + ... + g[j-1]
    table = cycles.to(dtype) * prefix[n] + prefix[rem]
    first = 1 - start - lo  # C(i - s + 1) starts at table index 1 - s - lo
    mask = _windows(table, first, n) - _windows(table, first - length, n)
    if hard:
        mask = torch.where(mask.abs() < EVAL_MASK_THRESHOLD, torch.zeros_like(mask), mask)
    return mask


def gaudi_mask_backward_ref(
    grad: Tensor, mask: Tensor, widths: Tensor, locations: Tensor, sigma: Tensor, n: int, hard: bool
) -> tuple[Tensor, Tensor]:
    """Gradients of sum(grad * mask) with respect to the widths and the locations (K,).

    The rounding passes gradients straight through, so they are the derivatives of the official
    closed form at the rounded point: dM/dw = G / sinc(f/n) e^{i pi f / n} e^{-2 pi i f (s + L)/n}
    (the end edge moves) and dM/dl = -2 pi i f M (both edges move). In space, with h from
    :func:`_edge_kernel`: dmask[i]/dw = h[i - s - L], dmask[i]/dl = h[i - s - L] - h[i - s]
    (indices mod n). The eval-mode thresholds stop the gradient of the entries they zero and of
    the widths the hardshrink drops.
    """
    dtype = _compute_dtype(widths.dtype)
    length, start = _lengths_starts(widths, locations, n, hard)
    h = _edge_kernel(sigma, n, dtype)
    g = grad.to(dtype)
    if hard:
        g = torch.where(mask != 0, g, torch.zeros_like(g))
    grad_width = (g * _periodic_windows(h, start + length)).sum(1)
    grad_loc = grad_width - (g * _periodic_windows(h, start)).sum(1)
    if hard:  # F.hardshrink passes no gradient to the widths it drops
        grad_width = torch.where(length != 0, grad_width, torch.zeros_like(grad_width))
    return grad_width.to(widths.dtype), grad_loc.to(locations.dtype)


@torch.library.custom_op("effnn::gaudi_mask", mutates_args=())
def _gaudi_mask_op(widths: Tensor, locations: Tensor, sigma: Tensor, n: int, hard: bool) -> Tensor:
    return gaudi_mask_ref(widths, locations, sigma, n, hard)


@_gaudi_mask_op.register_fake
def _(widths, locations, sigma, n, hard):
    return widths.new_empty((widths.shape[0], n), dtype=_compute_dtype(widths.dtype))


@torch.library.custom_op("effnn::gaudi_mask_backward", mutates_args=())
def _gaudi_mask_backward_op(
    grad: Tensor, mask: Tensor, widths: Tensor, locations: Tensor, sigma: Tensor, n: int, hard: bool
) -> tuple[Tensor, Tensor]:
    return gaudi_mask_backward_ref(grad, mask, widths, locations, sigma, n, hard)


@_gaudi_mask_backward_op.register_fake
def _(grad, mask, widths, locations, sigma, n, hard):
    return widths.new_empty(widths.shape), locations.new_empty(locations.shape)


def _mask_setup_context(ctx, inputs, output):
    widths, locations, sigma, n, hard = inputs
    ctx.save_for_backward(widths, locations, sigma, output)
    ctx.n, ctx.hard = n, hard


def _mask_backward(ctx, grad):
    widths, locations, sigma, mask = ctx.saved_tensors
    grad_w, grad_l = torch.ops.effnn.gaudi_mask_backward(
        grad.contiguous(), mask, widths, locations, sigma, ctx.n, ctx.hard
    )
    need_w, need_l = ctx.needs_input_grad[:2]
    return (grad_w if need_w else None, grad_l if need_l else None, None, None, None)


_gaudi_mask_op.register_autograd(_mask_backward, setup_context=_mask_setup_context)
register_macs(torch.ops.effnn.gaudi_mask, lambda *_: 0)  # gathers and adds, no products
register_macs(torch.ops.effnn.gaudi_mask_backward, lambda grad, *_: 2 * math.prod(grad))


def _check_float(op: str, name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{op}: {name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got {t.dtype}"
        )


def gaudi_mask(
    widths: Tensor,
    locations: Tensor,
    sigma: Tensor,
    n: int,
    *,
    hard: bool = False,
    backend: str = "auto",
) -> Tensor:
    """Gaudi masks (K, n) for ``widths`` and ``locations`` (K,), differentiable in both
    (straight-through rounding). See :func:`gaudi_mask_ref` for the arguments and
    :func:`gaudi_mask_backward_ref` for the gradients. Only the reference backend exists: the
    masks cost O(K n), independent of the batch.
    """
    op = "gaudi_mask"
    for name, t in (("widths", widths), ("locations", locations), ("sigma", sigma)):
        _check_float(op, name, t)
        if t.device != widths.device:
            raise ValueError(f"{op}: {name} is on {t.device} but widths is on {widths.device}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{op}: n must be a positive int, got {n!r}")
    if widths.dim() != 1 or tuple(locations.shape) != tuple(widths.shape):
        raise ValueError(
            f"{op}: widths and locations must be 1-D of one length K, got shapes "
            f"{tuple(widths.shape)} and {tuple(locations.shape)}"
        )
    if sigma.dim() != 0:
        raise ValueError(f"{op}: sigma must be a 0-d tensor, got shape {tuple(sigma.shape)}")
    select_backend(op, backend, widths.device, {"ref": lambda: []})
    return torch.ops.effnn.gaudi_mask(widths, locations, sigma, n, hard)


# --------------------------------------------------------------------------------------------
# The dense product (training, and the official eval computation)
# --------------------------------------------------------------------------------------------


def _masked_factors(lr_weight1: Tensor, lr_weight2: Tensor, mask_in: Tensor, mask_out: Tensor) -> tuple[Tensor, Tensor]:
    """u (out, K r) and v (K r, in): the masked factors, W = u @ v."""
    K, r, n = lr_weight1.shape
    m = lr_weight2.shape[1]
    u = (lr_weight2 * mask_out.to(lr_weight2.dtype).unsqueeze(2)).permute(1, 0, 2).reshape(m, K * r)
    v = (lr_weight1 * mask_in.to(lr_weight1.dtype).unsqueeze(1)).reshape(K * r, n)
    return u, v


def gblr_dense_weight(lr_weight1: Tensor, lr_weight2: Tensor, mask_in: Tensor, mask_out: Tensor) -> Tensor:
    """sum_k diag(mask_out[k]) lr_weight2[k] lr_weight1[k] diag(mask_in[k]): (out, in)."""
    u, v = _masked_factors(lr_weight1, lr_weight2, mask_in, mask_out)
    return u @ v


def gblr_masked_linear(
    x: Tensor, lr_weight1: Tensor, lr_weight2: Tensor, mask_in: Tensor, mask_out: Tensor,
    bias: Tensor | None,
) -> Tensor:
    """y = x W^T + bias for the masked GBLR weight W, x (..., in) -> (..., out).

    Two exact orders of the same sum, chosen by multiply-adds (the official 'dense' and 'lr'
    compute modes): materialise W (K r m n) and one GEMM (T m n), or the two factored GEMMs
    (T K r (m + n)), which wins for few tokens. Components whose two masks are both identically
    zero contribute nothing and receive zero gradients (every gradient of a component carries a
    factor of its other mask), so in eager mode they are left out of the products: after the
    proximal step most of them are (the official code still pays for them). Under
    ``torch.compile`` all components are kept (static shapes).
    """
    K, r, n = lr_weight1.shape
    m = lr_weight2.shape[1]
    if not torch.compiler.is_compiling() and K > 1:
        live = torch.nonzero((mask_in != 0).any(1) | (mask_out != 0).any(1)).flatten()
        if live.numel() < K:
            lr_weight1, lr_weight2 = lr_weight1.index_select(0, live), lr_weight2.index_select(0, live)
            mask_in, mask_out = mask_in.index_select(0, live), mask_out.index_select(0, live)
            K = live.numel()
    tokens = x.numel() // max(n, 1)
    u, v = _masked_factors(lr_weight1, lr_weight2, mask_in, mask_out)
    if tokens * K * r * (m + n) < K * r * m * n + tokens * m * n:
        return F.linear(F.linear(x, v), u, bias)
    return F.linear(x, u @ v, bias)


# --------------------------------------------------------------------------------------------
# The hard structure: intervals of the masks, and their packing into groups
# --------------------------------------------------------------------------------------------


def mask_intervals(mask: Tensor) -> tuple[Tensor, Tensor]:
    """(start, length) int64 (K,) of the shortest cyclic interval holding each row's nonzeros.

    A row without nonzeros has length 0 (start 0); a boxcar mask gives its own start and length.
    The interval starts at the nonzero after the longest cyclic run of zeros.
    """
    K, n = mask.shape
    nz = mask != 0
    idx = torch.arange(n, device=mask.device).expand(K, n)
    last_at = torch.cummax(torch.where(nz, idx, torch.full_like(idx, -1)), dim=1).values
    last = last_at[:, -1:]
    prev = torch.cat([torch.full_like(last, -1), last_at[:, :-1]], dim=1)
    prev = torch.where(prev < 0, last - n, prev)  # the previous nonzero, cyclically
    gap = torch.where(nz, idx - prev - 1, torch.full_like(idx, -1))
    best_gap, start = gap.max(dim=1)
    length = torch.where(nz.any(1), n - best_gap, torch.zeros_like(best_gap))
    return torch.where(length > 0, start, torch.zeros_like(start)), length


GROUP_OVERHEAD_ROWS = 64
"""Packing cost model: a group of q rank-rows over L columns costs L * (q + this), so that many
thin groups (slow, skinny GEMMs) lose against fewer, padded ones. 64 was the fastest of 16, 64,
192, 512 for 768 rank-1 components at random locations (docs/gblr.md)."""


def _group_intervals(start: Tensor, length: Tensor, rank: int, n: int) -> list[tuple[int, int, Tensor]]:
    """Partition components (cyclic intervals ``start``, ``length`` > 0 in a dimension of length
    n) into groups sharing one interval, the union of theirs: [(group start, group length,
    component indices)]. Components are sorted by (start, length); a dynamic programme over that
    order minimises sum over groups of union_length * (rows + GROUP_OVERHEAD_ROWS)."""
    K = start.numel()
    if K == 0:
        return []
    order = torch.argsort(start * (n + 1) + length, stable=True)
    s = start[order].to(torch.float64)
    e = s + length[order].to(torch.float64)
    best = torch.zeros(K + 1, dtype=torch.float64)
    choice = torch.zeros(K + 1, dtype=torch.int64)
    for j in range(1, K + 1):  # groups = runs of the sorted order: O(K^2), once per conversion
        ends = torch.flip(torch.cummax(torch.flip(e[:j], [0]), 0).values, [0])  # max e[i..j-1]
        union = torch.clamp(ends - s[:j], max=n)
        rows = rank * torch.arange(j, 0, -1, dtype=torch.float64)
        cost = best[:j] + union * (rows + GROUP_OVERHEAD_ROWS)
        i = int(torch.argmin(cost))
        best[j], choice[j] = cost[i], i
    groups = []
    j = K
    while j > 0:
        i = int(choice[j])
        members = order[i:j]
        g_start, g_end = int(s[i]), int(e[i:j].max())
        if g_end - g_start >= n:
            g_start, g_len = 0, n
        else:
            g_len = g_end - g_start
        groups.append((g_start, g_len, members))
        j = i
    return groups[::-1]


@dataclass
class GBLRPacked:
    """A GBLR matrix packed for :func:`gblr_structured`: y = x W^T, W (out_features, in_features).

    Stage 1 (inputs): group g reads the cyclic column range [start, start + length) of x and
    multiplies it by its factor block (nrows, length) into rows row0 .. row0 + nrows of z (the
    rank-rows of its components; components outside their own interval hold zeros). Stage 2
    (outputs): z is permuted (``z2 = z[perm]``) and group h adds z2 rows row0 .. row0 + nrows
    times its factor block (length, nrows) into the cyclic output range [start, start + length).

    ``in_meta``/``out_meta``: int64 (groups, 5) rows (start, length, row0, nrows, offset) with
    ``offset`` the block's position in the flat ``in_factor``/``out_factor``.
    """

    in_factor: Tensor
    in_meta: Tensor
    out_factor: Tensor
    out_meta: Tensor
    perm: Tensor
    in_features: int
    out_features: int

    @property
    def macs_per_token(self) -> int:
        """Multiply-adds per input vector of the packed product (padding included)."""
        return self.in_factor.numel() + self.out_factor.numel()


def _pack_side(groups, rank: int, device) -> tuple[Tensor, Tensor]:
    """(meta (G, 5), component order) for one stage; rows are (component, rank) pairs."""
    meta, order, row0, offset = [], [], 0, 0
    for g_start, g_len, members in groups:
        nrows = rank * members.numel()
        meta.append((g_start, g_len, row0, nrows, offset))
        order.append(members)
        row0 += nrows
        offset += nrows * g_len
    meta_t = torch.tensor(meta, dtype=torch.int64, device=device).view(-1, 5)
    order_t = torch.cat(order) if order else torch.zeros(0, dtype=torch.int64)
    return meta_t, order_t.to(device)


def _segments(meta: Tensor, device) -> tuple[Tensor, Tensor, Tensor]:
    """For every packed element of one stage: (group row index within its group, column t within
    the group's range, group start), flattened in the blocks' order (nrows, length) per group."""
    starts, lengths, _, nrows, _ = meta.unbind(1)
    sizes = nrows * lengths
    total = int(sizes.sum())
    gid = torch.repeat_interleave(torch.arange(meta.shape[0], device=device), sizes)
    local = torch.arange(total, device=device) - torch.repeat_interleave(torch.cumsum(sizes, 0) - sizes, sizes)
    return local // lengths[gid], local % lengths[gid], gid


def pack_structure(
    lr_weight1: Tensor, lr_weight2: Tensor, mask_in: Tensor, mask_out: Tensor
) -> GBLRPacked:
    """Pack the GBLR matrix sum_k diag(mask_out[k]) lr_weight2[k] lr_weight1[k] diag(mask_in[k]).

    Each component is cropped to the shortest cyclic intervals holding its masks' nonzeros (the
    mask values are folded into its factors, so the packed product equals the masked one for any
    mask); components with an empty mask are dropped. Components are grouped per stage by
    :func:`_group_intervals`; the factor blocks are gathered without loops over components.
    """
    K, r, n = lr_weight1.shape
    m = lr_weight2.shape[1]
    dev = lr_weight1.device
    with torch.no_grad():
        v = lr_weight1 * mask_in.to(lr_weight1.dtype).unsqueeze(1)  # (K, r, n)
        u = lr_weight2 * mask_out.to(lr_weight2.dtype).unsqueeze(2)  # (K, m, r)
        s_in, l_in = (t.cpu() for t in mask_intervals(mask_in))
        s_out, l_out = (t.cpu() for t in mask_intervals(mask_out))
        live = torch.nonzero((l_in > 0) & (l_out > 0)).flatten()
        groups_in = [(a, b, live[c]) for a, b, c in _group_intervals(s_in[live], l_in[live], r, n)]
        groups_out = [(a, b, live[c]) for a, b, c in _group_intervals(s_out[live], l_out[live], r, m)]
        in_meta, in_order = _pack_side(groups_in, r, dev)
        out_meta, out_order = _pack_side(groups_out, r, dev)

        # stage 1 block of group g: A[(c, j), t] = v[c, j, (start + t) mod n]
        row, t, gid = _segments(in_meta, dev)
        comp = in_order[(in_meta[gid, 2] + row) // r]
        in_factor = v[comp, row % r, (in_meta[gid, 0] + t) % n]
        # stage 2 block of group h: B[t, (c, j)] = u[c, (start + t) mod m, j], stored (length, nrows)
        row, t, gid = _segments(out_meta, dev)
        comp = out_order[(out_meta[gid, 2] + row) // r]
        out_factor = u[comp, (out_meta[gid, 0] + t) % m, row % r]
        out_factor = _rows_to_cols(out_factor, out_meta)

        # rank-row (c, j) sits at stage-1 row pos_in[c] * r + j; stage 2 lists rows in its order
        pos_in = torch.empty(K, dtype=torch.int64, device=dev)
        pos_in[in_order] = torch.arange(in_order.numel(), device=dev)
        perm = (pos_in[out_order].unsqueeze(1) * r + torch.arange(r, device=dev)).flatten()
    return GBLRPacked(in_factor.contiguous(), in_meta, out_factor.contiguous(), out_meta, perm, n, m)


def _rows_to_cols(flat: Tensor, meta: Tensor) -> Tensor:
    """Blocks gathered as (nrows, length) per group, rewritten as (length, nrows)."""
    row, t, gid = _segments(meta, flat.device)
    nrows, offsets = meta[gid, 3], meta[gid, 4]
    out = torch.empty_like(flat)
    out[offsets + t * nrows + row] = flat
    return out


# --------------------------------------------------------------------------------------------
# The structured product (reference path): one GEMM per group and stage, on views of x and y
# --------------------------------------------------------------------------------------------


def _groups(meta: Tensor) -> list[list[int]]:
    return meta.tolist()  # a handful of groups; their GEMMs span all tokens


def _structured_forward_ref(
    x: Tensor, in_factor: Tensor, in_meta: Tensor, out_factor: Tensor, out_meta: Tensor,
    perm: Tensor, bias: Tensor | None, out_features: int,
) -> tuple[Tensor, Tensor]:
    T, n = x.shape
    m = out_features
    zt = x.new_empty(perm.numel(), T)  # feature-major: a group writes a contiguous block of rows
    for s, L, r0, nr, off in _groups(in_meta):
        a = in_factor[off:off + nr * L].view(nr, L)
        if s + L <= n:
            torch.mm(a, x[:, s:s + L].t(), out=zt[r0:r0 + nr])
        else:  # the range wraps around the last column
            torch.mm(a[:, :n - s], x[:, s:].t(), out=zt[r0:r0 + nr])
            zt[r0:r0 + nr].addmm_(a[:, n - s:], x[:, :s + L - n].t())
    z2t = zt.index_select(0, perm)
    if bias is None:
        y = x.new_zeros(T, m)
    else:
        y = bias.to(x.dtype).expand(T, m).contiguous()
    for s, L, r0, nr, off in _groups(out_meta):
        b = out_factor[off:off + L * nr].view(L, nr)
        zg = z2t[r0:r0 + nr].t()
        if s + L <= m:
            y[:, s:s + L].addmm_(zg, b.t())
        else:
            y[:, s:].addmm_(zg, b[:m - s].t())
            y[:, :s + L - m].addmm_(zg, b[m - s:].t())
    return y, z2t


def gblr_structured_ref(
    x: Tensor, in_factor: Tensor, in_meta: Tensor, out_factor: Tensor, out_meta: Tensor,
    perm: Tensor, bias: Tensor | None, out_features: int,
) -> Tensor:
    """Reference forward of the packed product for 2-D ``x`` (T, in_features)."""
    return _structured_forward_ref(x, in_factor, in_meta, out_factor, out_meta, perm, bias, out_features)[0]


def gblr_structured_backward_ref(
    grad_y: Tensor, x: Tensor, z2t: Tensor, in_factor: Tensor, in_meta: Tensor, out_factor: Tensor,
    out_meta: Tensor, perm: Tensor, need_input_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_x or an empty tensor, grad_in_factor, grad_out_factor); ``z2t`` is the forward's
    permuted middle activation, feature-major (rows, T)."""
    T, n = x.shape
    m = grad_y.shape[1]
    g_out = torch.empty_like(out_factor)
    gz2t = torch.empty_like(z2t)
    for s, L, r0, nr, off in _groups(out_meta):
        b = out_factor[off:off + L * nr].view(L, nr)
        gb = g_out[off:off + L * nr].view(L, nr)
        zg = z2t[r0:r0 + nr].t()
        if s + L <= m:
            gy = grad_y[:, s:s + L]
            torch.mm(b.t(), gy.t(), out=gz2t[r0:r0 + nr])
            torch.mm(gy.t(), zg, out=gb)
        else:
            gy1, gy2 = grad_y[:, s:], grad_y[:, :s + L - m]
            torch.mm(b[:m - s].t(), gy1.t(), out=gz2t[r0:r0 + nr])
            gz2t[r0:r0 + nr].addmm_(b[m - s:].t(), gy2.t())
            torch.mm(gy1.t(), zg, out=gb[:m - s])
            torch.mm(gy2.t(), zg, out=gb[m - s:])
    gzt = torch.empty_like(gz2t)
    gzt[perm] = gz2t
    g_in = torch.empty_like(in_factor)
    gx = x.new_zeros(T, n) if need_input_grad else x.new_empty(0)
    for s, L, r0, nr, off in _groups(in_meta):
        a = in_factor[off:off + nr * L].view(nr, L)
        ga = g_in[off:off + nr * L].view(nr, L)
        gz = gzt[r0:r0 + nr]
        if s + L <= n:
            torch.mm(gz, x[:, s:s + L], out=ga)
            if need_input_grad:
                gx[:, s:s + L].addmm_(gz.t(), a)
        else:
            torch.mm(gz, x[:, s:], out=ga[:, :n - s])
            torch.mm(gz, x[:, :s + L - n], out=ga[:, n - s:])
            if need_input_grad:
                gx[:, s:].addmm_(gz.t(), a[:, :n - s])
                gx[:, :s + L - n].addmm_(gz.t(), a[:, n - s:])
    return gx, g_in, g_out


def _triton_kernels():
    from effnn.kernels import gblr

    return gblr


def _structured_forward(x, in_factor, in_meta, out_factor, out_meta, perm, bias, out_features, save_z,
                        backend="ref"):
    if backend == "triton":
        return _triton_kernels().forward(x, in_factor, in_meta, out_factor, out_meta, perm, bias,
                                         out_features, save_z)
    y, z2t = _structured_forward_ref(x, in_factor, in_meta, out_factor, out_meta, perm, bias, out_features)
    return y, (z2t if save_z else x.new_empty(0))


@torch.library.custom_op("effnn::gblr_structured", mutates_args=())
def _gblr_structured_op(
    x: Tensor, in_factor: Tensor, in_meta: Tensor, out_factor: Tensor, out_meta: Tensor,
    perm: Tensor, bias: Tensor | None, out_features: int, backend: str, save_z: bool,
) -> tuple[Tensor, Tensor]:
    """Returns (y, z2t): z2t is the permuted middle activation (rows, T), kept for the backward
    when ``save_z``, else an empty tensor."""
    return _structured_forward(x, in_factor, in_meta, out_factor, out_meta, perm, bias,
                               out_features, save_z, backend)


@_gblr_structured_op.register_fake
def _(x, in_factor, in_meta, out_factor, out_meta, perm, bias, out_features, backend, save_z):
    z = x.new_empty((perm.shape[0], x.shape[0])) if save_z else x.new_empty(0)
    return x.new_empty((x.shape[0], out_features)), z


@torch.library.custom_op("effnn::gblr_structured_backward", mutates_args=())
def _gblr_structured_backward_op(
    grad_y: Tensor, x: Tensor, z2t: Tensor, in_factor: Tensor, in_meta: Tensor, out_factor: Tensor,
    out_meta: Tensor, perm: Tensor, need_input_grad: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    if backend == "triton":
        return _triton_kernels().backward(grad_y, x, z2t, in_factor, in_meta, out_factor, out_meta,
                                          perm, need_input_grad)
    return gblr_structured_backward_ref(grad_y, x, z2t, in_factor, in_meta, out_factor, out_meta,
                                        perm, need_input_grad)


@_gblr_structured_backward_op.register_fake
def _(grad_y, x, z2t, in_factor, in_meta, out_factor, out_meta, perm, need_input_grad, backend):
    grad_x = x.new_empty(x.shape) if need_input_grad else x.new_empty(0)
    return grad_x, in_factor.new_empty(in_factor.shape), out_factor.new_empty(out_factor.shape)


def _structured_setup_context(ctx, inputs, output):
    x, in_factor, in_meta, out_factor, out_meta, perm, bias, out_features, backend, save_z = inputs
    ctx.save_for_backward(x, output[1], in_factor, in_meta, out_factor, out_meta, perm)
    ctx.mark_non_differentiable(output[1])
    ctx.backend, ctx.out_features = backend, out_features


def _structured_backward(ctx, grad_y, _grad_z):
    x, z2t, in_factor, in_meta, out_factor, out_meta, perm = ctx.saved_tensors
    need_x, need_a = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_b, need_bias = ctx.needs_input_grad[3], ctx.needs_input_grad[6]
    grad_x = grad_a = grad_b = grad_bias = None
    if need_x or need_a or need_b:
        if z2t.dim() == 1:  # called with save_z=False: recompute the middle activation
            _, z2t = torch.ops.effnn.gblr_structured(x, in_factor, in_meta, out_factor, out_meta,
                                                     perm, None, ctx.out_features, ctx.backend, True)
        grad_x, grad_a, grad_b = torch.ops.effnn.gblr_structured_backward(
            grad_y.contiguous(), x, z2t, in_factor, in_meta, out_factor, out_meta, perm, need_x, ctx.backend
        )
    if need_bias:
        grad_bias = grad_y.sum(0)
    return (grad_x if need_x else None, grad_a if need_a else None, None,
            grad_b if need_b else None, None, None, grad_bias, None, None, None)


_gblr_structured_op.register_autograd(_structured_backward, setup_context=_structured_setup_context)


def _structured_forward_macs(x_shape, a_shape, _im, b_shape, *_) -> int:
    return x_shape[0] * (math.prod(a_shape) + math.prod(b_shape))


def _structured_backward_macs(g_shape, x_shape, _z, a_shape, _im, b_shape, _om, _p, need_x, *_) -> int:
    a, b = math.prod(a_shape), math.prod(b_shape)
    return x_shape[0] * (2 * b + a + (a if need_x else 0))


register_macs(torch.ops.effnn.gblr_structured, _structured_forward_macs)
register_macs(torch.ops.effnn.gblr_structured_backward, _structured_backward_macs)


def _triton_reasons(x: Tensor, packed: GBLRPacked) -> list[str]:
    reasons = triton_device_reasons(x.device)
    return reasons or _triton_kernels().unsupported_reasons(x, packed.in_factor, packed.out_factor)


def choose_backend(x: Tensor, packed: GBLRPacked, backend: str = "auto") -> str:
    """The backend :func:`gblr_structured` runs for 2-D ``x`` and ``packed`` (raises BackendError
    if a forced ``backend`` cannot serve them)."""
    return select_backend("gblr_structured", backend, x.device,
                          {"ref": lambda: [], "triton": lambda: _triton_reasons(x, packed)})


def gblr_structured(
    x: Tensor, packed: GBLRPacked, bias: Tensor | None = None, *, backend: str = "auto"
) -> Tensor:
    """Apply a packed GBLR matrix to ``x`` (..., in_features); returns (..., out_features).

    Costs ``packed.macs_per_token`` multiply-adds per vector (the structure's, plus the padding of
    its groups) instead of in*out. ``backend``: "auto", "ref" (PyTorch GEMMs on views of x and y,
    one per group and stage) or "triton" (``effnn/kernels/gblr.py``, CUDA tensors, forward and
    backward). Differentiable in x, the packed factors and the bias.
    """
    op = "gblr_structured"
    n, m = packed.in_features, packed.out_features
    if isinstance(x, Tensor) and x.device.type != "meta" and torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x = x.to(dtype)
    _check_float(op, "x", x)
    for name, t in (("in_factor", packed.in_factor), ("out_factor", packed.out_factor), ("bias", bias)):
        if t is None:
            continue
        _check_float(op, name, t)
        if t.dtype != x.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but x has dtype {x.dtype}; cast them to one dtype")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    if x.dim() < 1 or x.shape[-1] != n:
        raise ValueError(f"{op}: x must have shape (..., {n}), got {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (m,):
        raise ValueError(f"{op}: bias must have shape ({m},), got {tuple(bias.shape)}")
    x2d = x.reshape(-1, n)
    chosen = choose_backend(x2d, packed, backend)
    save_z = torch.is_grad_enabled() and (
        x.requires_grad or packed.in_factor.requires_grad or packed.out_factor.requires_grad
    )
    y, _ = torch.ops.effnn.gblr_structured(
        x2d.contiguous(), packed.in_factor, packed.in_meta, packed.out_factor, packed.out_meta,
        packed.perm, bias, m, chosen, save_z,
    )
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], m)


# --------------------------------------------------------------------------------------------
# Initialisation from a dense weight under a budget
# --------------------------------------------------------------------------------------------


_FULL_SVD_MAX = 96  # larger blocks: randomized SVD of their leading 96 directions per round


@dataclass
class _Component:
    row_start: int
    rows: int
    col_start: int
    cols: int
    u: Tensor  # (rows, r), singular values folded in (sqrt each side)
    v: Tensor  # (cols, r)


def _pieces(start: int, size: int, n: int) -> list[tuple[slice, slice]]:
    """A cyclic interval as at most two (matrix slice, block slice) pairs."""
    first = min(size, n - start)
    out = [(slice(start, start + first), slice(0, first))]
    if first < size:
        out.append((slice(0, size - first), slice(first, size)))
    return out


def _get_block(mat: Tensor, c: _Component) -> Tensor:
    block = mat.new_empty(c.rows, c.cols)
    for mr, br in _pieces(c.row_start, c.rows, mat.shape[0]):
        for mc, bc in _pieces(c.col_start, c.cols, mat.shape[1]):
            block[br, bc] = mat[mr, mc]
    return block


def _add_block(mat: Tensor, c: _Component, delta: Tensor) -> None:
    for mr, br in _pieces(c.row_start, c.rows, mat.shape[0]):
        for mc, bc in _pieces(c.col_start, c.cols, mat.shape[1]):
            mat[mr, mc] += delta[br, bc]


def gblr_project(
    weight: Tensor,
    budget: float,
    *,
    num_components: int | None = None,
    rank_per_component: int = 1,
    num_scales: int = 5,
    rounds: int = 100,
    refit_sweeps: int = 3,
    steps: int = 1000,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """GBLR parameters (widths (2, K), locations (2, K), lr_weight1 (K, r, in), lr_weight2
    (K, out, r)) approximating ``weight`` (out, in) at an official cost of at most
    ``budget * out * in`` multiply-adds per vector, with the Gaussian off.

    The best, by the eval-mode error, of three candidates:

    - the truncated SVD of the same cost (all widths 1), so the result is never worse than it;
    - a greedy pursuit over cyclic blocks at ``num_scales`` sizes per dimension (the full length,
      halves, quarters, ...; positions at half-size strides): each round estimates every block's
      top-r singular values of the residual, and takes the blocks with the largest captured energy
      per multiply-add that do not overlap one another; then ``refit_sweeps`` passes refit each
      component to its block given the others (block-coordinate descent). Strong where the
      weight has block structure;
    - (``steps`` > 0) gradient descent on the masked product, the scheme of the official
      ``olb.find_olb`` (K components from the SVD at full width, random locations, AdamW with
      betas (0, 0.999) on factors and structure through the Gaudi mask, learning rates decaying
      linearly to 1 %, widths shifted uniformly after each step to hold the budget), then
      ``steps // 3`` Adam steps on the factors alone under the final hard masks (the structure
      fixed). Strong on weights without block structure, where it beats the truncated SVD (a
      random 768 x 768 ``nn.Linear`` weight at 40 %: 0.598 against 0.682; docs/gblr.md).

    ``seed`` fixes the random initial locations. Cost: the descent's ``steps`` dense products of
    the weight's size (about 2 minutes for 768 x 768 on one CPU thread; ``steps=0`` skips it).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"gblr_project: steps must be a non-negative int, got {steps!r}")
    m, n = weight.shape
    r = rank_per_component
    K = num_components if num_components is not None else min(m, n) // r
    dev = weight.device
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.detach().to(dtype)
    limit = int(budget * m * n)

    svd = torch.linalg.svd(w, full_matrices=False)  # the first candidate and the descent's start
    candidates = [_svd_candidate(w, svd, K, r, limit),
                  _pursuit_candidate(w, K, r, limit, num_scales, rounds, refit_sweeps)]
    if steps > 0:
        descended = _descent_candidate(w, svd, K, r, limit, steps, seed)
        if descended is not None:
            candidates.append(descended)
    errors = [_eval_error(w, *c) for c in candidates]
    best = candidates[min(range(len(candidates)), key=errors.__getitem__)]
    return tuple(t.to(device=dev, dtype=weight.dtype) for t in best)


def _eval_masks(widths: Tensor, locations: Tensor, m: int, n: int) -> tuple[Tensor, Tensor]:
    inf = torch.tensor(math.inf, dtype=widths.dtype, device=widths.device)
    return (gaudi_mask_ref(widths[0], locations[0], inf, n, hard=True),
            gaudi_mask_ref(widths[1], locations[1], inf, m, hard=True))


def _eval_error(w: Tensor, widths: Tensor, locations: Tensor, w1: Tensor, w2: Tensor) -> float:
    """Relative Frobenius error of the eval-mode weight (the one ``to_linear`` returns)."""
    norm = torch.linalg.norm(w)
    if norm == 0:
        return 0.0
    mask_in, mask_out = _eval_masks(widths, locations, *w.shape)
    return float(torch.linalg.norm(gblr_dense_weight(w1, w2, mask_in, mask_out) - w) / norm)


def _official_cost(widths: Tensor, m: int, n: int, r: int) -> int:
    """The official multiply-adds per vector with the Gaussian off (``macs_per_token``): a
    component counts when both rounded lengths exceed 1, and costs min(r (a + b), a b)."""
    b = torch.round(widths[0] * n)
    a = torch.round(widths[1] * m)
    live = (a > 1) & (b > 1)
    return int((torch.minimum(r * (a + b), a * b) * live).sum())


def _fit_budget_(widths: Tensor, limit: int, m: int, n: int, r: int) -> None:
    """Clamp the widths to [0, 1], then shift them all down by the one amount d >= 0 that brings
    their nominal cost r (sum(w_in - d)+ n + sum(w_out - d)+ m) to the budget (the official
    shift uses the mean width, which is the same for a square weight). The cost is piecewise
    linear in d: with the widths sorted in decreasing order, d for the first j widths staying
    positive is (their weighted sum - limit / r) / their total weight."""
    widths.clamp_(0, 1)
    K = widths.shape[1]
    v = widths.flatten()
    c = torch.cat([v.new_full((K,), n), v.new_full((K,), m)])
    if r * float(c @ v) <= limit:
        return
    v, order = v.sort(descending=True)
    c = c[order]
    shift = ((c * v).cumsum(0) - limit / r) / c.cumsum(0)
    below = torch.cat([v[1:], v.new_zeros(1)])
    j = int(torch.nonzero((shift >= below) & (shift <= v))[0])
    widths.sub_(shift[j]).clamp_(0, 1)


def _svd_candidate(w: Tensor, svd, K: int, r: int, limit: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    m, n = w.shape
    u, s, vh = svd
    used = min(limit // (r * (m + n)), K, s.numel() // r)
    widths, locations, w1, w2 = _empty_parameters(K, r, m, n, w)
    root = s[:used * r].sqrt()
    w1[:used] = (vh[:used * r] * root[:, None]).view(used, r, n)
    w2[:used] = (u[:, :used * r] * root).view(m, used, r).transpose(0, 1)
    widths[:, :used] = 1.0
    return widths, locations, w1, w2


def _empty_parameters(K: int, r: int, m: int, n: int, like: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return (like.new_zeros(2, K), like.new_zeros(2, K), like.new_zeros(K, r, n), like.new_zeros(K, m, r))


def _pursuit_candidate(w: Tensor, K: int, r: int, limit: int, num_scales: int, rounds: int,
                       refit_sweeps: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    m, n = w.shape
    comps = _pursuit(w, limit, K, r, num_scales, rounds)
    residual = w.clone()
    for c in comps:
        _add_block(residual, c, -(c.u @ c.v.t()))
    # block-coordinate descent: the components on one block, refit jointly to the best rank-q
    # approximation of the residual plus themselves (an exact minimisation over that group)
    blocks: dict[tuple[int, int, int, int], list[_Component]] = {}
    for c in comps:
        blocks.setdefault((c.row_start, c.rows, c.col_start, c.cols), []).append(c)
    for _ in range(refit_sweeps):
        for group in blocks.values():
            c0 = group[0]
            u = torch.cat([c.u for c in group], 1)
            v = torch.cat([c.v for c in group], 1)
            target = _get_block(residual, c0) + u @ v.t()
            nu, ns, nv = _truncated_svd(target, u.shape[1])
            root = ns.sqrt()
            nu, nv = nu * root, nv * root
            _add_block(residual, c0, u @ v.t() - nu @ nv.t())
            for i, c in enumerate(group):
                c.u, c.v = nu[:, i * r:(i + 1) * r], nv[:, i * r:(i + 1) * r]
    widths, locations, w1, w2 = _empty_parameters(K, r, m, n, w)
    for k, c in enumerate(comps):
        for mc, bc in _pieces(c.col_start, c.cols, n):
            w1[k][:, mc] = c.v[bc].t()
        for mr, br in _pieces(c.row_start, c.rows, m):
            w2[k][mr] = c.u[br]
        widths[0, k], widths[1, k] = c.cols / n, c.rows / m
        locations[0, k], locations[1, k] = c.col_start / n, c.row_start / m
    return widths, locations, w1, w2


# The descent's hyper-parameters. Structure: the official 20 / min(m, n) (``structure_lr_base``
# 20 of ``InitFromPretrained``). Factors: the official 5e-3 is an absolute step, tuned for
# pretrained weights whose SVD factors have entries of about 0.03; scaled here with the factors'
# RMS so that the descent does not depend on the weight's scale.
_FACTOR_LR = 0.15  # x the RMS of the initial factors
_POLISH_LR = 0.045


def _descent_candidate(w: Tensor, svd, K: int, r: int, limit: int, steps: int,
                       seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    m, n = w.shape
    if K * r > min(m, n):
        return None  # the start needs K r singular directions
    norm2 = w.square().sum()
    if norm2 == 0:
        return None
    u, s, vh = svd
    root = s[:K * r].sqrt()
    w1 = (vh[:K * r] * root[:, None]).view(K, r, n)
    w2 = (u[:, :K * r] * root).view(m, K, r).transpose(0, 1).contiguous()
    factor_rms = float(torch.cat([w1.flatten(), w2.flatten()]).square().mean().sqrt())
    widths = w.new_ones(2, K)
    generator = torch.Generator().manual_seed(seed)
    locations = torch.rand(2, K, generator=generator, dtype=w.dtype).to(w.device)
    inf = torch.tensor(math.inf, dtype=w.dtype, device=w.device)

    params = [t.requires_grad_() for t in (widths, locations, w1, w2)]
    optimizer = torch.optim.AdamW([
        {"params": params[2:], "lr": _FACTOR_LR * factor_rms},
        {"params": params[:2], "lr": 20.0 / min(m, n)},
    ], betas=(0.0, 0.999), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.01, total_iters=steps)
    with torch.enable_grad():
        for _ in range(steps):
            mask_in = gaudi_mask(widths[0], locations[0], inf, n)
            mask_out = gaudi_mask(widths[1], locations[1], inf, m)
            loss = (gblr_dense_weight(w1, w2, mask_in, mask_out) - w).square().sum() / norm2
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                _fit_budget_(widths, limit, m, n, r)
                locations.sub_(locations.floor())
    widths, locations = widths.detach(), locations.detach()
    # the nominal cost holds the budget; rounding can still exceed it by a few multiply-adds
    while _official_cost(widths, m, n, r) > limit:
        widths.sub_(0.5 / max(m, n)).clamp_(0, 1)

    # the structure fixed: the factors alone, under the eval-mode masks
    mask_in, mask_out = _eval_masks(widths, locations, m, n)
    w1, w2 = w1.detach().requires_grad_(), w2.detach().requires_grad_()
    polish_steps = steps // 3
    optimizer = torch.optim.Adam([w1, w2], lr=_POLISH_LR * factor_rms)
    schedule = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.01, total_iters=max(polish_steps, 1))
    with torch.enable_grad():
        for _ in range(polish_steps):
            loss = (gblr_dense_weight(w1, w2, mask_in, mask_out) - w).square().sum() / norm2
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return widths, locations, w1.detach(), w2.detach()


def _truncated_svd(block: Tensor, q: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-q singular triplets (u (a, q), s (q,), v (b, q)); randomized for large blocks."""
    if min(block.shape) > _FULL_SVD_MAX and q < min(block.shape) // 2:
        u, s, v = torch.svd_lowrank(block, q=min(q + 16, min(block.shape)), niter=4)
        return u[:, :q], s[:q], v[:, :q]
    u, s, vh = torch.linalg.svd(block, full_matrices=False)
    return u[:, :q], s[:q], vh[:q].t()


def _pursuit(w: Tensor, limit: int, K: int, r: int, num_scales: int, rounds: int) -> list[_Component]:
    """The greedy block pursuit of :func:`gblr_project` (components in the order taken).

    Each round takes the SVD of every candidate block of the residual (batched per size) and
    ranks its rank-r atoms (r consecutive singular triplets) by captured energy per multiply-add.
    Atoms are taken in that order while they reach half the best score; a block taken this round
    excludes the blocks overlapping it, while more atoms of the same block stay exact (its
    singular directions are orthogonal), so one round can take many components.
    """
    m, n = w.shape
    dev = w.device
    classes = []  # (rows, cols, row starts, col starts)
    for i in range(num_scales):
        a, b = m >> i, n >> i
        if a < max(2, r) or b < max(2, r) or min(r * (a + b), a * b) > limit:
            continue
        # a grid of blocks aligned to the sizes, and the grid shifted by half a block both ways
        for shift in (0, 1) if a < m or b < n else (0,):
            rs = list(range(shift * (a // 2), m, a)) if a < m else [0]
            cs = list(range(shift * (b // 2), n, b)) if b < n else [0]
            classes.append((a, b, rs, cs))
    residual = w.clone()
    comps: list[_Component] = []
    spent = 0
    changed = torch.ones(m, n, dtype=torch.bool, device=dev)  # where the residual changed
    cache: list[list[Tensor]] = [[] for _ in classes]  # per class: u, s, vh, scores
    for _ in range(rounds):
        if len(comps) >= K:
            break
        tiled = residual.repeat(2, 2)  # every cyclic block is a window of the residual tiled 2 x 2
        tiled_changed = changed.repeat(2, 2)
        for c, (a, b, rs, cs) in enumerate(classes):
            blocks = tiled[rs[0]:, cs[0]:].unfold(0, a, a).unfold(1, b, b)[: len(rs), : len(cs)]
            blocks = blocks.reshape(-1, a, b)
            # only the blocks the last round touched need a new SVD
            dirty = tiled_changed[rs[0]:, cs[0]:].unfold(0, a, a).unfold(1, b, b)[: len(rs), : len(cs)]
            dirty = torch.nonzero(dirty.reshape(blocks.shape[0], -1).any(1)).flatten()
            if dirty.numel() == 0:
                continue
            sub = blocks.index_select(0, dirty)
            if min(a, b) > _FULL_SVD_MAX:  # a round takes a block's leading atoms only
                u, s, v = torch.svd_lowrank(sub, q=_FULL_SVD_MAX, niter=3)
                vh = v.transpose(-1, -2)
            else:
                u, s, vh = torch.linalg.svd(sub, full_matrices=False)
            q = s.shape[1] // r * r
            energy = s[:, :q].square().view(s.shape[0], -1, r).sum(-1)  # (blocks, atoms)
            score = energy / min(r * (a + b), a * b)
            if not cache[c]:
                cache[c] = [u.new_zeros(blocks.shape[0], *u.shape[1:]), s.new_zeros(blocks.shape[0], *s.shape[1:]),
                            vh.new_zeros(blocks.shape[0], *vh.shape[1:]),
                            score.new_zeros(blocks.shape[0], *score.shape[1:])]
            for store, value in zip(cache[c], (u, s, vh, score), strict=True):
                store[dirty] = value
        scores = [entry[3] for entry in cache]
        factors = [entry[:3] for entry in cache]
        flat = torch.cat([sc.flatten() for sc in scores])
        if flat.numel() == 0 or float(flat.max()) <= 0:
            break
        best = float(flat.max())
        order = torch.argsort(flat, descending=True)
        count = int((flat >= 0.5 * best).sum())
        bounds = torch.cumsum(torch.tensor([0] + [sc.numel() for sc in scores]), 0).tolist()
        covered = torch.zeros(m, n, dtype=torch.bool, device=dev)
        claimed: set[tuple[int, int]] = set()
        taken = 0
        for flat_index in order[:count].tolist():
            c = next(i for i in range(len(classes)) if flat_index < bounds[i + 1])
            local = flat_index - bounds[c]
            a, b, rs, cs = classes[c]
            block, atom = divmod(local, scores[c].shape[1])
            cost = min(r * (a + b), a * b)
            if len(comps) >= K or spent + cost > limit:
                continue
            u, s, vh = factors[c]
            sl = slice(atom * r, (atom + 1) * r)
            root = s[block, sl].sqrt()
            comp = _Component(rs[block // len(cs)], a, cs[block % len(cs)], b,
                              u[block][:, sl] * root, vh[block][sl].t() * root)
            if (c, block) not in claimed:
                if _get_block(covered, comp).any():
                    continue
                for mr, _ in _pieces(comp.row_start, a, m):
                    for mc, _ in _pieces(comp.col_start, b, n):
                        covered[mr, mc] = True
                claimed.add((c, block))
            _add_block(residual, comp, -(comp.u @ comp.v.t()))
            comps.append(comp)
            spent += cost
            taken += 1
        if taken == 0:
            break
        changed = covered
    return comps
