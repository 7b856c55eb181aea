"""Window attention on point clouds with contextual relative position encoding, in cubic windows
and in SphereFormer's radial windows (Lai et al., "Spherical Transformer for LiDAR-based 3D
Recognition", CVPR 2023; official code dvlab-research/SphereFormer and its attention library
dvlab-research/SparseTransformer, "sptr").

Points ``s`` (N, 3) -- cartesian xyz for cubic windows, (azimuth deg, polar deg, range) from
:func:`cart2sphere` for radial windows -- with a batch index are partitioned into windows::

    window(i) = (batch[i], floor((s[i] - origin) / window_size))         per axis

and every point attends to every point of its own window (itself included). For heads ``h``::

    score[i, j] = scale*q_i . k_j + scale*q_i . sum_a T_q[idx_a(i,j), a, h] + k_j . sum_a T_k[idx_a(i,j), a, h]
    p[i, :]     = softmax over j in window(i)
    out[i]      = sum_j p[i, j] * (v_j + sum_a T_v[idx_a(i,j), a, h])

as sptr's ``dot_prod_with_idx_all`` / ``attention_step2_with_rel_pos_value`` compute it (the key
term is not scaled). The relative index per axis ``a``, with in-window codes
``c = floor(((s - origin) mod window_size) / quant_size)`` and ``L = int((window_size + 1e-4) / quant_size)``:

- linear axes: ``idx = c_i - c_j + L - 1`` in [0, 2L-2] (tables of 2L-1 rows; cubic windows, and
  the two angular axes of radial windows);
- the exponential-split axis (range of radial windows, ``exp_split_a`` set):
  ``idx = clamp(exponential_split(r_i - r_j, a) + L, 0, 2L-1)`` (tables of 2L rows), where the
  bins start at width ``a`` and double every two bins (:func:`exponential_split`).

``origin="fixed"`` anchors windows and codes at 0 (a cloud's windows do not depend on the rest of
the batch); ``origin="batch_min"`` anchors them at the minimum over the whole batch, as sptr does
(``get_indices_params`` -> torch_geometric ``voxel_grid``; ``sparse_self_attention``'s
``xyz - xyz.min(0)``), for parity with official weights.

This file holds the reference implementation (plain PyTorch: points sorted by window, windows
bucketed by size with at most 25% padding, each bucket processed in chunks as padded batched
matmuls), its
flash-style backward (only the output and the log-sum-exp are saved, so memory stays linear in the
within-window pairs of a chunk), the registered ops ``effnn::window_attention`` and
``effnn::window_attention_backward``, and the public functions with validation and dispatch.
The relative position terms are computed per point and per bucket: ``q . T_q`` and ``k . T_k`` as
(points, heads, 3 * rows) tables gathered per pair, and the value term as a per-query histogram of
attention mass over the table rows times ``T_v``; never as per-pair vectors of head_dim.

Backends: ``ref`` (this file), ``ext``, the fused C++ kernel of csrc/window_attention_cpu.cpp
in the optional extension effnn._C (CPU; ``backend="auto"`` takes it when it is built; when
effnn._C is built with EFFNN_BUILD_CUDA=1, csrc/window_attention_cuda.cu serves CUDA tensors too,
forced with ``backend="ext"``: not yet run on a GPU, so ``"auto"`` does not pick it), and
``triton``, the flash-style kernels of effnn/kernels/radial_window.py (CUDA tensors; ``"auto"``
takes them there; CPU tensors only under ``TRITON_INTERPRET=1``, for tests). All use
:func:`window_partition` and the same codes; the kernels get the window order and read q, k, v in
place.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from effnn import _ext
from effnn.ops._dispatch import (
    ext_cuda_reasons,
    ext_device_reasons,
    select_backend,
    triton_device_reasons,
)

__all__ = [
    "cart2sphere",
    "exponential_split",
    "quant_grid_length",
    "window_partition",
    "window_attention",
    "window_attention_ref",
    "window_attention_backward_ref",
    "radial_window_attention",
]

ORIGINS = ("fixed", "batch_min")

# Upper bound on the values of one chunk's largest temporaries (heads x windows x n x (n + the
# per-query row tables, about 256 wide with position encoding)): peak memory is the saved O(N)
# tensors plus one chunk, whatever the window sizes.
_CHUNK_SLOTS = 1 << 21
_ROW_WIDTH = 256


def cart2sphere(xyz: Tensor) -> Tensor:
    """(N, 3) cartesian -> (N, 3) (azimuth in degrees in [0, 360], polar angle from +z in degrees
    in [0, 180], range), as SphereFormer's ``cart2sphere``: azimuth = atan2(y, x) + 180 deg."""
    x, y, z = xyz.unbind(-1)
    # the official expression order, so that window boundaries round as the official code does
    theta = (torch.atan2(y, x) + math.pi) * 180 / math.pi
    beta = torch.atan2(torch.sqrt(x * x + y * y), z) * 180 / math.pi
    return torch.stack([theta, beta, torch.sqrt(x * x + y * y + z * z)], -1)


def exponential_split(rel: Tensor, a: float) -> Tensor:
    """Signed bin of a range difference ``rel`` (SphereFormer's ``exponential_split``, before its
    offset): [0, a) -> 0, [a, 2a) -> 1, [2a, 4a) -> 2, [4a, 6a) -> 3, [6a, 10a) -> 4, ...: bin
    widths start at ``a`` and double every two bins; negative differences mirror to -1, -2, ...
    (bin b of |rel| -> -b - 1). Returns int64.

    The official closed form is b = 2 floor(log2 x) - 2 + [x >= 1.5 * 2^floor(log2 x)] with
    x = (|rel| + 2a) / a >= 2: the exponent of x and the first bit of its mantissa. They are read
    from the float bits directly (exact at the bin edges, where log2 can round either way).
    """
    if rel.dtype == torch.float64:
        bits, shift, bias = torch.int64, 51, 2048  # 2 * 1023 + 2
    else:
        rel = rel.float()
        bits, shift, bias = torch.int32, 22, 256  # 2 * 127 + 2
    x = (rel.abs() + 2 * a) / a
    b = (x.view(bits) >> shift) - bias  # (2 * biased exponent + first mantissa bit) - bias
    return torch.where(rel < 0, ~b, b).long()  # ~b = -b - 1


def quant_grid_length(window_size: float, quant_size: float) -> int:
    """L of sptr/SphereFormer: the number of quantisation bins per window along one axis."""
    return int((window_size + 1e-4) / quant_size)


# --------------------------------------------------------------------------------------------
# Partition
# --------------------------------------------------------------------------------------------


def _origin(coords: Tensor, origin: str) -> Tensor:
    if origin == "batch_min":
        return coords.amin(0)
    return coords.new_zeros(3)


def window_partition(
    coords: Tensor, batch: Tensor, window_size: tuple[float, float, float] | list[float],
    origin: str = "fixed",
) -> tuple[Tensor, Tensor, Tensor]:
    """Windows of points ``coords`` (N, 3) with batch index ``batch`` (N,).

    Returns ``(order, window, counts)``: ``order`` (N,) sorts the points by window, ``window`` (N,)
    is the window id of each point in that sorted order (0 .. W-1, windows ordered by batch, then by
    cell), ``counts`` (W,) the points per window. Needs ``N > 0``.
    """
    w = torch.tensor(window_size, dtype=coords.dtype, device=coords.device)
    cell = torch.floor((coords - _origin(coords, origin)) / w).long()
    cell = cell - cell.amin(0)
    extent = (cell.amax(0) + 1).tolist()
    n_batch = int(batch.max()) + 1
    if n_batch * math.prod(extent) >= 2**62:
        raise ValueError(
            f"window_partition: {n_batch} clouds x {extent} windows per axis do not fit a 64-bit "
            "window key; the coordinates span far more windows than any point cloud should "
            f"(window_size={tuple(window_size)})"
        )
    key = ((batch.long() * extent[0] + cell[:, 0]) * extent[1] + cell[:, 1]) * extent[2] + cell[:, 2]
    _, inverse, counts = torch.unique(key, sorted=True, return_inverse=True, return_counts=True)
    order = torch.argsort(inverse, stable=True)
    return order, inverse[order], counts


def _codes(coords: Tensor, window_size, quant_size, L: int, origin: str) -> Tensor:
    """In-window quantisation codes (N, 3) in [0, L-1] of sptr's ``sparse_self_attention``.
    The clamp only acts when rounding puts a point on the window's far edge (code L: sptr's index
    would then pass its table and fail its ``L > rel_idx.max()`` assertion)."""
    w = torch.tensor(window_size, dtype=coords.dtype, device=coords.device)
    q = torch.tensor(quant_size, dtype=coords.dtype, device=coords.device)
    rel = torch.remainder(coords - _origin(coords, origin), w)
    return torch.div(rel, q, rounding_mode="floor").clamp_(0, L - 1).long()


# --------------------------------------------------------------------------------------------
# Reference path
# --------------------------------------------------------------------------------------------


def _padded_size(counts: Tensor) -> Tensor:
    """Bucket size of windows of ``counts`` points: exact up to 8, then rounded up to a multiple
    of a quarter of the power of two below (10, 12, 14, 16, 20, 24, ...): at most 25% padding per
    axis (about 1.56x pair slots at worst), where powers of two would waste up to 4x."""
    step = torch.pow(2, torch.floor(torch.log2((counts - 1).clamp(min=1).double())) - 2).long().clamp(min=1)
    return torch.where(counts <= 8, counts, (counts + step - 1) // step * step)


class _Layout:
    """Points sorted by window and the windows bucketed by size (:func:`_padded_size`), each bucket
    cut into chunks of at most ``_CHUNK_SLOTS`` values of (head, query, key or table row)."""

    def __init__(self, coords: Tensor, batch: Tensor, window_size, origin: str, heads: int):
        order, _, counts = window_partition(coords, batch, window_size, origin)
        self.order = order
        starts = torch.cumsum(counts, 0) - counts
        size = _padded_size(counts)
        self.chunks: list[tuple[Tensor, Tensor]] = []  # (slot -> sorted position (W, n), valid)
        for n in torch.unique(size).tolist():
            sel = torch.nonzero(size == n).squeeze(1)
            ar = torch.arange(n, device=coords.device)
            per_chunk = max(1, _CHUNK_SLOTS // (heads * n * (n + _ROW_WIDTH)))
            for lo in range(0, sel.numel(), per_chunk):
                s = sel[lo:lo + per_chunk]
                valid = ar < counts[s, None]
                pos = torch.where(valid, starts[s, None] + ar, starts[s, None])  # padded -> first point
                self.chunks.append((pos, valid))


class _RelPos:
    """Per-point data of the relative position encoding, in window-sorted order, and its per-chunk
    indices.

    The linear axes (all three of cubic windows, the two angles of radial windows) never build a
    per-pair index: with ``Pq[i] = scale*q_i . T_q`` (rows of all axes), the query term of a pair
    is ``Qrow[i, a, c_j] = Pq[i, a, c_i - c_j + L - 1]``, a row of ``Qrow`` (per point: L entries per
    axis) picked by the key's code; as a product with the key's one-hot codes it joins the q.k
    matmul (``qa = [Qrow, q, onehot]``, ``ka = [onehot, k, Krow]``), and the value term is
    ``P @ onehot`` re-indexed to table rows. Only the exponential-split axis needs a per-pair index
    (a nonlinear function of r_i - r_j), gathered and scattered per pair.
    """

    def __init__(self, coords: Tensor, window_size, quant_size, exp_split_a, origin, rows, order):
        L = quant_grid_length(window_size[0], quant_size[0])
        self.L, self.rows, self.a = L, rows, exp_split_a
        self.lin = 2 if exp_split_a is not None else 3  # the linear axes come first
        self.codes = _codes(coords, window_size, quant_size, L, origin)[order, :self.lin]
        self.r = coords[order, 2]
        dev = coords.device
        self._m = torch.arange(L, device=dev)
        self._axis_row = (torch.arange(self.lin, device=dev) * rows)[:, None]  # (A, 1)
        self._axis_code = (torch.arange(self.lin, device=dev) * L)[:, None]

    def chunk(self, pos: Tensor, dtype) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """For slots ``pos`` (W, n): one-hot codes (W, n, A*L) in ``dtype``, the table rows of
        Qrow and Krow (W, n, A*L), and the exponential-split row index (W, n, n) or None."""
        c = self.codes[pos]  # (W, n, A)
        W, n, A = c.shape
        L = self.L
        onehot = torch.zeros(W, n, A * L, dtype=dtype, device=pos.device)
        onehot.scatter_(-1, c + self._axis_code.T, 1.0)
        cc = c[..., None]  # (W, n, A, 1)
        row_q = (self._axis_row + cc - self._m + (L - 1)).reshape(W, n, A * L)
        row_k = (self._axis_row + self._m - cc + (L - 1)).reshape(W, n, A * L)
        idx = None
        if self.a is not None:
            r = self.r[pos]
            idx = (exponential_split(r[:, :, None] - r[:, None, :], self.a) + L).clamp_(0, 2 * L - 1)
            idx += 2 * self.rows  # the rows of axis 2 in the (3 * rows) layout
        return onehot, row_q, row_k, idx


def _tables3(table: Tensor, dtype) -> Tensor:
    """(rows, 3, h, d) -> (h, 3*rows, d): one matmul for the three axes."""
    R, _, h, d = table.shape
    return table.to(dtype).permute(2, 1, 0, 3).reshape(h, 3 * R, d)


def _expand(index: Tensor, h: int) -> Tensor:
    """(W, n, k) -> (h, W, n, k) view: one index for every head."""
    return index[None].expand(h, *index.shape)


def _per_row(x: Tensor, T3: Tensor) -> Tensor:
    """x (h, W, n, d) . T3 (h, 3R, d) -> (h, W, n, 3R), as one batched matmul over heads."""
    h, W, n, d = x.shape
    return torch.bmm(x.reshape(h, W * n, d), T3.transpose(1, 2)).view(h, W, n, -1)


def _from_rows(rows: Tensor, T3: Tensor) -> Tensor:
    """rows (h, W, n, 3R) @ T3 (h, 3R, d) -> (h, W, n, d), as one batched matmul over heads."""
    h, W, n, k = rows.shape
    return torch.bmm(rows.reshape(h, W * n, k), T3).view(h, W, n, -1)


def _add_row_grad(grad: Tensor, rows: Tensor, x: Tensor) -> None:
    """grad (h, 3R, d) += sum over slots of rows (h, W, n, 3R) outer x (h, W, n, d)."""
    h, W, n, d = x.shape
    grad.baddbmm_(rows.reshape(h, W * n, -1).transpose(1, 2), x.reshape(h, W * n, d))


def _slots(x: Tensor, pos: Tensor) -> Tensor:
    """Head-major (h, N, d) in sorted order -> (h, W, n, d) for the slots ``pos`` (W, n): chunks are
    batched over (head, window), so the gather is already in matmul layout."""
    return x[:, pos]


class _Chunk:
    """Scores and probabilities of one chunk of windows (recomputed by the backward)."""

    def __init__(self, qs, ks, vs, pos, valid, rel, Tq3, Tk3):
        self.qc, self.kc, self.vc = _slots(qs, pos), _slots(ks, pos), _slots(vs, pos)
        self.rel = rel
        h = self.qc.shape[0]
        if rel is None:
            self.qa, self.ka, self.va = self.qc, self.kc, self.vc
        else:
            self.onehot, self.row_q, self.row_k, self.idx = rel.chunk(pos, qs.dtype)
            Pq = _per_row(self.qc, Tq3)  # (h, W, n, 3R)
            Pk = _per_row(self.kc, Tk3)
            self.Pq, self.Pk = Pq, Pk
            oh = _expand(self.onehot, h)
            # column order chosen so that the backward needs a prefix of ka and a suffix of qa
            self.qa = torch.cat([Pq.gather(-1, _expand(self.row_q, h)), self.qc, oh], -1)
            self.ka = torch.cat([oh, self.kc, Pk.gather(-1, _expand(self.row_k, h))], -1)
            self.va = torch.cat([self.vc, oh], -1)
        s = self.qa @ self.ka.transpose(-1, -2)
        if rel is not None and self.idx is not None:
            ie = _expand(self.idx, h)
            s += self.Pq.gather(-1, ie)
            s += self.Pk.gather(-1, ie.transpose(-1, -2)).transpose(-1, -2)
        # padded keys: -inf added (a broadcast add is far cheaper than masked_fill on the CPU)
        self.s = s.add_(torch.zeros(valid.shape, dtype=s.dtype, device=s.device)
                        .masked_fill_(~valid, float("-inf"))[None, :, None, :])

    def rows(self, p: Tensor, Hlin: Tensor) -> Tensor:
        """Per-query attention mass over the table rows (h, W, n, 3R), from the linear-axis
        histogram ``Hlin`` = p @ onehot and, on the exponential axis, the pairs' rows."""
        h, W, n, _ = p.shape
        out = p.new_zeros(h, W, n, 3 * self.rel.rows)
        out.scatter_(-1, _expand(self.row_q, h), Hlin)
        if self.idx is not None:
            out.scatter_add_(-1, _expand(self.idx, h), p)
        return out


def _prepare(q, k, v, coords, batch, table_q, table_k, table_v, window_size, quant_size,
             exp_split_a, origin, scale):
    compute = torch.promote_types(q.dtype, torch.float32)
    layout = _Layout(coords, batch, window_size, origin, q.shape[1])
    o = layout.order
    qs, ks, vs = ((x[o].to(compute) * f).transpose(0, 1).contiguous()  # (h, N, d)
                  for x, f in ((q, scale), (k, 1.0), (v, 1.0)))
    rel = Tq3 = Tk3 = Tv3 = None
    if table_q is not None:
        rel = _RelPos(coords, window_size, quant_size, exp_split_a, origin, table_q.shape[0], o)
        Tq3, Tk3, Tv3 = (_tables3(t, compute) for t in (table_q, table_k, table_v))
    return layout, qs, ks, vs, rel, Tq3, Tk3, Tv3


def window_attention_ref(
    q: Tensor, k: Tensor, v: Tensor, coords: Tensor, batch: Tensor,
    table_q: Tensor | None, table_k: Tensor | None, table_v: Tensor | None,
    window_size: list[float], quant_size: list[float] | None, exp_split_a: float | None,
    origin: str, scale: float,
) -> tuple[Tensor, Tensor]:
    """Reference forward: q, k, v (N, h, d), coords (N, 3), batch (N,) int64, tables (rows, 3, h, d)
    or None. Returns (out (N, h, d) in q's dtype, lse (N, h) in float32 or float64)."""
    N, h, d = q.shape
    layout, qs, ks, vs, rel, Tq3, Tk3, Tv3 = _prepare(
        q, k, v, coords, batch, table_q, table_k, table_v, window_size, quant_size, exp_split_a,
        origin, scale)
    out = qs.new_empty(h, N, d)
    lse = qs.new_empty(h, N)
    for pos, valid in layout.chunks:
        c = _Chunk(qs, ks, vs, pos, valid, rel, Tq3, Tk3)
        s = c.s
        m = s.amax(-1, keepdim=True)
        p = torch.exp(s.sub_(m))
        denom = p.sum(-1, keepdim=True)
        p /= denom
        oa = p @ c.va
        oc = oa[..., :d]
        if rel is not None:
            oc = oc + _from_rows(c.rows(p, oa[..., d:]), Tv3)
        sel = pos[valid]
        out[:, sel] = oc[:, valid]
        lse[:, sel] = (m + torch.log(denom)).squeeze(-1)[:, valid]
    result = torch.empty_like(out)
    result[:, layout.order] = out
    lse_out = torch.empty_like(lse)
    lse_out[:, layout.order] = lse
    result, lse_out = result.transpose(0, 1), lse_out.transpose(0, 1)
    return result.to(q.dtype).contiguous(), lse_out.contiguous()


def window_attention_backward_ref(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, coords: Tensor,
    batch: Tensor, table_q: Tensor | None, table_k: Tensor | None, table_v: Tensor | None,
    window_size: list[float], quant_size: list[float] | None, exp_split_a: float | None,
    origin: str, scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Reference backward (flash-style: probabilities recomputed from the saved ``lse``). Returns
    the gradients of q, k, v and of the three tables (None without tables)."""
    layout, qs, ks, vs, rel, Tq3, Tk3, Tv3 = _prepare(
        q, k, v, coords, batch, table_q, table_k, table_v, window_size, quant_size, exp_split_a,
        origin, scale)
    o = layout.order
    d = q.shape[-1]
    dO = grad_out[o].to(qs.dtype).transpose(0, 1).contiguous()  # (h, N, d)
    D = (dO * out[o].to(qs.dtype).transpose(0, 1)).sum(-1)  # (h, N): sum_j p_ij dp_ij
    lse_s = lse[o].to(qs.dtype).transpose(0, 1)
    dq, dk, dv = torch.zeros_like(qs), torch.zeros_like(ks), torch.zeros_like(vs)
    dTq3 = dTk3 = dTv3 = None
    if rel is not None:
        dTq3, dTk3, dTv3 = torch.zeros_like(Tq3), torch.zeros_like(Tk3), torch.zeros_like(Tv3)
    for pos, valid in layout.chunks:
        c = _Chunk(qs, ks, vs, pos, valid, rel, Tq3, Tk3)
        h = c.qc.shape[0]
        vq = valid[None, :, :, None].to(qs.dtype)  # padded query rows get no gradient
        p = torch.exp(c.s.sub_(_slots(lse_s[..., None], pos))).mul_(vq)
        dOc = _slots(dO, pos)
        if rel is None:
            dOa = dOc
        else:
            G = _per_row(dOc, Tv3)  # (h, W, n, 3R): d out . T_v row
            dOa = torch.cat([dOc, G.gather(-1, _expand(c.row_q, h))], -1)
            _add_row_grad(dTv3, c.rows(p, p @ c.va[..., d:]), dOc)
        dp = dOa @ c.va.transpose(-1, -2)
        if rel is not None and c.idx is not None:
            dp += G.gather(-1, _expand(c.idx, h))
        dvc = p.transpose(-1, -2) @ dOc
        ds = p.mul_(dp.sub_(_slots(D[..., None], pos)))
        if rel is None:
            dqc = ds @ c.kc
            dkc = ds.transpose(-1, -2) @ c.qc
        else:
            AL = c.row_q.shape[-1]
            dqa = ds @ c.ka[..., :AL + d]  # [d Qrow, d q] (the one-hot columns need none)
            dka = ds.transpose(-1, -2) @ c.qa[..., AL:]  # [d k, d Krow]
            dqc, dkc = dqa[..., AL:], dka[..., :d]
            dPq = c.Pq.new_zeros(c.Pq.shape).scatter_(-1, _expand(c.row_q, h), dqa[..., :AL])
            dPk = c.Pk.new_zeros(c.Pk.shape).scatter_(-1, _expand(c.row_k, h), dka[..., d:])
            if c.idx is not None:
                ie = _expand(c.idx, h)
                dPq.scatter_add_(-1, ie, ds)
                dPk.scatter_add_(-1, ie.transpose(-1, -2), ds.transpose(-1, -2))
            dqc = dqc + _from_rows(dPq, Tq3)
            dkc = dkc + _from_rows(dPk, Tk3)
            _add_row_grad(dTq3, dPq, c.qc)
            _add_row_grad(dTk3, dPk, c.kc)
        sel = pos[valid]
        dq.index_add_(1, sel, dqc[:, valid])
        dk.index_add_(1, sel, dkc[:, valid])
        dv.index_add_(1, sel, dvc[:, valid])
    grads = []
    for g, src in ((dq * scale, q), (dk, k), (dv, v)):
        full = torch.empty_like(g)
        full[:, o] = g
        grads.append(full.transpose(0, 1).to(src.dtype).contiguous())
    tables = (None, None, None)
    if rel is not None:
        R = table_q.shape[0]
        tables = tuple(
            g.view(g.shape[0], 3, R, g.shape[-1]).permute(2, 1, 0, 3).contiguous().to(t.dtype)
            for g, t in ((dTq3, table_q), (dTk3, table_k), (dTv3, table_v))
        )
    return (*grads, *tables)

# --------------------------------------------------------------------------------------------
# Compiled CPU kernel (effnn._C, csrc/window_attention_cpu.cpp)
# --------------------------------------------------------------------------------------------


def _ext_prepare(q, coords, batch, table_q, table_k, table_v, window_size, quant_size,
                 exp_split_a, origin):
    """The kernel's window data -- the same partition and codes as the reference: the order of
    the points by window, the window offsets, the linear-axis codes (int32) and the
    exponential-split coordinate in that order -- and the tables as (h, 3, rows, d)."""
    compute = torch.promote_types(q.dtype, torch.float32)
    order, _, counts = window_partition(coords, batch, window_size, origin)
    starts = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    codes, r, tables, L = coords.new_empty(0, dtype=torch.int32), coords.new_empty(0), (None,) * 3, 0
    if table_q is not None:
        L = quant_grid_length(window_size[0], quant_size[0])
        lin = 2 if exp_split_a is not None else 3
        codes = _codes(coords, window_size, quant_size, L, origin)[order, :lin].int()
        r = coords[order, 2].contiguous()
        tables = tuple(t.to(compute).permute(2, 1, 0, 3).contiguous() for t in (table_q, table_k, table_v))
    return order, starts, codes, r, tables, L


def _window_attention_ext(q, k, v, coords, batch, table_q, table_k, table_v, window_size,
                          quant_size, exp_split_a, origin, scale):
    compute = torch.promote_types(q.dtype, torch.float32)
    io = q.dtype if q.is_cuda else compute  # the CUDA kernel reads fp16/bf16 (sums in fp32)
    order, starts, codes, r, tables, L = _ext_prepare(
        q, coords, batch, table_q, table_k, table_v, window_size, quant_size, exp_split_a, origin)
    # the kernel reads q, k, v in place (strided views of a fused projection) and through `order`
    out, lse = torch.ops.effnn_ext.window_attention_forward(
        q.to(io), k.to(io), v.to(io), order, starts, codes, r, *tables, L,
        exp_split_a, scale)
    return out.to(q.dtype), lse


def _window_attention_backward_ext(grad_out, q, k, v, out, lse, coords, batch, table_q, table_k,
                                   table_v, window_size, quant_size, exp_split_a, origin, scale):
    compute = torch.promote_types(q.dtype, torch.float32)
    io = q.dtype if q.is_cuda else compute  # the CUDA kernel reads fp16/bf16 (sums in fp32)
    order, starts, codes, r, tables, L = _ext_prepare(
        q, coords, batch, table_q, table_k, table_v, window_size, quant_size, exp_split_a, origin)
    grads = torch.ops.effnn_ext.window_attention_backward(
        grad_out.to(io), q.to(io), k.to(io), v.to(io), out.to(io),
        lse.to(compute), order, starts, codes, r, *tables, L, exp_split_a, scale)
    result = [g.to(src.dtype) for g, src in zip(grads[:3], (q, k, v), strict=True)]
    for g, t in zip(grads[3:], (table_q, table_k, table_v), strict=True):
        result.append(None if t is None else g.permute(2, 1, 0, 3).contiguous().to(t.dtype))
    return tuple(result)


def _ext_reasons(device: torch.device) -> list[str]:
    if device.type == "cuda":  # csrc/window_attention_cuda.cu, when effnn._C was built with CUDA
        return ext_cuda_reasons("effnn_ext::window_attention_forward")
    reasons = ext_device_reasons(device)
    if not reasons and not hasattr(torch.ops.effnn_ext, "window_attention_forward"):
        reasons.append("effnn._C was built without the window attention kernel (rebuild it: "
                       f"{_ext.BUILD_HINT})")
    return reasons


# --------------------------------------------------------------------------------------------
# Triton kernels (effnn/kernels/radial_window.py)
# --------------------------------------------------------------------------------------------


def _triton_kernels():
    from effnn.kernels import radial_window

    return radial_window


def _triton_reasons(q: Tensor) -> list[str]:
    reasons = triton_device_reasons(q.device)
    return reasons or _triton_kernels().unsupported_reasons(q)


# --------------------------------------------------------------------------------------------
# Registered ops
# --------------------------------------------------------------------------------------------


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


@torch.library.custom_op("effnn::window_attention", mutates_args=())
def _window_attention_op(
    q: Tensor, k: Tensor, v: Tensor, coords: Tensor, batch: Tensor,
    table_q: Tensor | None, table_k: Tensor | None, table_v: Tensor | None,
    window_size: list[float], quant_size: list[float] | None, exp_split_a: float | None,
    origin: str, scale: float, backend: str,
) -> tuple[Tensor, Tensor]:
    """Returns (out, lse); see :func:`window_attention_ref`."""
    if q.shape[0] == 0:
        return q.new_zeros(q.shape), q.new_zeros(q.shape[:2], dtype=_lse_dtype(q.dtype))
    with torch.autocast(q.device.type, enabled=False):  # the kernels pick their own precision
        if backend == "triton":
            return _triton_kernels().forward(q, k, v, coords, batch, table_q, table_k, table_v,
                                             window_size, quant_size, exp_split_a, origin, scale)
        if backend == "ext":
            return _window_attention_ext(q, k, v, coords, batch, table_q, table_k, table_v,
                                         window_size, quant_size, exp_split_a, origin, scale)
        return window_attention_ref(q, k, v, coords, batch, table_q, table_k, table_v, window_size,
                                    quant_size, exp_split_a, origin, scale)


@_window_attention_op.register_fake
def _(q, k, v, coords, batch, table_q, table_k, table_v, window_size, quant_size, exp_split_a,
      origin, scale, backend):
    return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=_lse_dtype(q.dtype))


@torch.library.custom_op("effnn::window_attention_backward", mutates_args=())
def _window_attention_backward_op(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, coords: Tensor,
    batch: Tensor, table_q: Tensor | None, table_k: Tensor | None, table_v: Tensor | None,
    window_size: list[float], quant_size: list[float] | None, exp_split_a: float | None,
    origin: str, scale: float, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of q, k, v and the three tables (empty tensors when there are no tables)."""
    if q.shape[0] == 0:
        grads = [torch.zeros_like(t) for t in (q, k, v)]
        grads += [q.new_empty(0) if t is None else torch.zeros_like(t) for t in (table_q, table_k, table_v)]
        return tuple(grads)
    with torch.autocast(q.device.type, enabled=False):
        backward = window_attention_backward_ref
        if backend == "ext":
            backward = _window_attention_backward_ext
        elif backend == "triton":
            backward = _triton_kernels().backward
        grads = backward(
            grad_out, q, k, v, out, lse, coords, batch, table_q, table_k, table_v, window_size,
            quant_size, exp_split_a, origin, scale)
    return tuple(q.new_empty(0) if g is None else g for g in grads)


@_window_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, coords, batch, table_q, table_k, table_v, window_size,
      quant_size, exp_split_a, origin, scale, backend):
    grads = [q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)]
    grads += [q.new_empty(0) if t is None else t.new_empty(t.shape) for t in (table_q, table_k, table_v)]
    return tuple(grads)


def _setup_context(ctx, inputs, output):
    (q, k, v, coords, batch, table_q, table_k, table_v, window_size, quant_size, exp_split_a,
     origin, scale, backend) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, coords, batch, table_q, table_k, table_v)
    ctx.mark_non_differentiable(lse)
    ctx.params = (window_size, quant_size, exp_split_a, origin, scale, backend)


def _autograd_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, coords, batch, table_q, table_k, table_v = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if not any(needs[:3] + needs[5:8]):
        return (None,) * 14
    grads = torch.ops.effnn.window_attention_backward(
        grad_out.contiguous(), q, k, v, out, lse, coords, batch, table_q, table_k, table_v,
        *ctx.params)
    dq, dk, dv, dtq, dtk, dtv = (g if need else None for g, need in zip(grads, needs[:3] + needs[5:8], strict=True))
    return dq, dk, dv, None, None, dtq, dtk, dtv, None, None, None, None, None, None


_window_attention_op.register_autograd(_autograd_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public entry points: validation, autocast, dispatch
# --------------------------------------------------------------------------------------------

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def choose_backend(q: Tensor, backend: str = "auto") -> str:
    """The backend :func:`window_attention` runs for ``q`` (raises BackendError if ``backend`` is
    forced and cannot serve it): ``ext`` (the compiled CPU kernel, when effnn._C is built) or
    ``ref`` for CPU tensors, ``triton`` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``)
    or ``ref`` for CUDA tensors."""
    return select_backend("window_attention", backend, q.device, {
        "ref": lambda: [],
        "triton": lambda: _triton_reasons(q),
        "ext": lambda: _ext_reasons(q.device),
    })


def _triple(name: str, value, fn: str) -> list[float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = (value,) * 3
    try:
        out = [float(x) for x in value]
    except (TypeError, ValueError):
        raise TypeError(f"{fn}: {name} must be a number or 3 numbers, got {value!r}") from None
    if len(out) != 3 or not all(math.isfinite(x) and x > 0 for x in out):
        raise ValueError(f"{fn}: {name} must be 3 positive finite numbers, got {value!r}")
    return out


def _check(fn, q, k, v, coords, batch, tables, window_size, quant_size, exp_split_a, origin) -> None:
    for name, t in (("q", q), ("k", k), ("v", v), ("coords", coords), ("batch", batch)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a Tensor, got {type(t).__name__}")
    if q.dim() != 3:
        raise ValueError(f"{fn}: q must be 3-D (N, heads, head_dim), got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{fn}: {name} must have q's shape {tuple(q.shape)}, got {tuple(t.shape)}")
    N = q.shape[0]
    if tuple(coords.shape) != (N, 3):
        raise ValueError(f"{fn}: coords must have shape ({N}, 3), got {tuple(coords.shape)}")
    if tuple(batch.shape) != (N,):
        raise ValueError(f"{fn}: batch must have shape ({N},), got {tuple(batch.shape)}")
    for name, t in (("q", q), ("k", k), ("v", v), ("coords", coords)):
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{fn}: {name} must be a floating-point tensor, got {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{fn}: {name} has dtype {t.dtype} but q has {q.dtype}; use one dtype "
                            "(or torch.autocast)")
    if batch.dtype not in _INT_DTYPES:
        raise TypeError(f"{fn}: batch must be an integer tensor (batch index per point), got {batch.dtype}")
    for name, t in (("k", k), ("v", v), ("coords", coords), ("batch", batch)):
        if t.device != q.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but q is on {q.device}; use one device")
    if origin not in ORIGINS:
        raise ValueError(f"{fn}: origin must be one of {ORIGINS}, got {origin!r}")
    if exp_split_a is not None and not (math.isfinite(exp_split_a) and exp_split_a > 0):
        raise ValueError(f"{fn}: exp_split_a must be a positive number or None, got {exp_split_a!r}")
    present = [t is not None for t in tables]
    if any(present) and not all(present):
        raise ValueError(f"{fn}: give all three tables (table_q, table_k, table_v) or none")
    if all(present):
        if quant_size is None:
            raise ValueError(f"{fn}: quant_size is required with position tables")
        L = quant_grid_length(window_size[0], quant_size[0])
        lengths = [quant_grid_length(w, s) for w, s in zip(window_size, quant_size, strict=True)]
        linear_axes = 2 if exp_split_a is not None else 3
        if L < 1 or any(x != L for x in lengths[:linear_axes]):
            raise ValueError(
                f"{fn}: window_size / quant_size must give one number of bins L >= 1 on every "
                f"quantised axis, got {lengths[:linear_axes]} for window_size={window_size}, "
                f"quant_size={quant_size}")
        rows = 2 * L if exp_split_a is not None else 2 * L - 1
        h, d = q.shape[1:]
        for name, t in zip(("table_q", "table_k", "table_v"), tables, strict=True):
            if not isinstance(t, Tensor):
                raise TypeError(f"{fn}: {name} must be a Tensor, got {type(t).__name__}")
            if tuple(t.shape) != (rows, 3, h, d):
                raise ValueError(f"{fn}: {name} must have shape ({rows}, 3, {h}, {d}) for L={L} "
                                 f"{'(exp split: 2L rows)' if exp_split_a is not None else '(2L-1 rows)'}"
                                 f", got {tuple(t.shape)}")
            if t.dtype not in _FLOAT_DTYPES:
                raise TypeError(f"{fn}: {name} must be a floating-point tensor, got {t.dtype}")
            if t.device != q.device:
                raise ValueError(f"{fn}: {name} is on {t.device} but q is on {q.device}")
    if torch.compiler.is_compiling():  # the value checks below would break the graph
        return
    if N and not bool(torch.isfinite(coords).all()):
        raise ValueError(f"{fn}: coords contain NaN or inf; every point needs finite coordinates")
    if N and int(batch.min()) < 0:
        raise ValueError(f"{fn}: batch indices must be >= 0, got minimum {int(batch.min())}")


def window_attention(
    q: Tensor, k: Tensor, v: Tensor, coords: Tensor, batch: Tensor,
    window_size, *,
    table_q: Tensor | None = None, table_k: Tensor | None = None, table_v: Tensor | None = None,
    quant_size=None, exp_split_a: float | None = None, origin: str = "fixed",
    scale: float | None = None, backend: str = "auto",
) -> Tensor:
    """Attention of every point to the points of its window; returns (N, heads, head_dim).

    ``q``, ``k``, ``v`` (N, heads, head_dim); ``coords`` (N, 3) in the windows' coordinates;
    ``batch`` (N,) the cloud of each point (any order); ``window_size`` a number or 3 numbers.
    With ``table_q``, ``table_k``, ``table_v`` (rows, 3, heads, head_dim) and ``quant_size``, adds
    sptr's contextual relative position terms (see the module docstring); ``exp_split_a`` switches
    the third axis to SphereFormer's exponential split with first bin width ``a``. ``scale``
    defaults to head_dim ** -0.5 and multiplies q (not the key term). Half-precision inputs are
    computed in float32; the output has q's dtype.
    """
    fn = "window_attention"
    if isinstance(q, Tensor) and q.device.type != "meta" and torch.is_autocast_enabled(q.device.type):
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v, table_q, table_k, table_v = (
            t.to(dtype) if isinstance(t, Tensor) else t for t in (q, k, v, table_q, table_k, table_v))
    window_size = _triple("window_size", window_size, fn)
    quant_size = None if quant_size is None else _triple("quant_size", quant_size, fn)
    tables = (table_q, table_k, table_v)
    _check(fn, q, k, v, coords, batch, tables, window_size, quant_size, exp_split_a, origin)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    chosen = choose_backend(q, backend)
    if table_q is None:
        quant_size = exp_split_a = None
    coords = coords if coords.dtype in (torch.float32, torch.float64) else coords.float()
    out, _ = torch.ops.effnn.window_attention(
        q, k, v, coords, batch.long(), table_q, table_k, table_v, window_size, quant_size,
        None if exp_split_a is None else float(exp_split_a), origin, float(scale), chosen)
    return out


def radial_window_attention(
    q: Tensor, k: Tensor, v: Tensor, xyz: Tensor, batch: Tensor,
    window_size=(2.0, 2.0, 120.0), *,
    table_q: Tensor | None = None, table_k: Tensor | None = None, table_v: Tensor | None = None,
    quant_size=None, a: float = 0.0125, origin: str = "fixed", scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """SphereFormer's radial-window attention: :func:`window_attention` on
    ``cart2sphere(xyz)`` (sensor-centred xyz) with windows (azimuth deg, polar deg, range) and the
    exponential split of range differences (first bin ``a`` metres) for the position tables
    (rows 2L). ``quant_size`` defaults to window_size / 24 (SphereFormer's quant_size_scale)."""
    if not isinstance(xyz, Tensor) or xyz.dim() != 2 or xyz.shape[-1] != 3:
        raise ValueError(f"radial_window_attention: xyz must have shape (N, 3), got "
                         f"{tuple(xyz.shape) if isinstance(xyz, Tensor) else type(xyz).__name__}")
    coords = cart2sphere(xyz if xyz.dtype in (torch.float32, torch.float64) else xyz.float())
    if quant_size is None and table_q is not None:
        quant_size = [w / 24 for w in _triple("window_size", window_size, "radial_window_attention")]
    return window_attention(q, k, v, coords, batch, window_size, table_q=table_q, table_k=table_k,
                            table_v=table_v, quant_size=quant_size, exp_split_a=a, origin=origin,
                            scale=scale, backend=backend)
