"""Triton kernels for the packed GBLR product (``effnn::gblr_structured``), forward and backward.

Semantics (``effnn.ops.gblr._structured_forward_ref`` and ``gblr_structured_backward_ref``,
packing ``GBLRPacked``)::

    stage 1, in-group g = (s, L, r0, nr, off):  A_g = in_factor[off : off + nr L].view(nr, L)
        zt[r0 + i, t] = sum_c A_g[i, c] * x[t, (s + c) mod n]          (i < nr)
    stage 2, out-group h = (s, L, r0, nr, off): B_h = out_factor[off : off + L nr].view(L, nr)
        y[t, (s + c) mod m] += sum_q zt[perm[r0 + q], t] * B_h[c, q]    (c < L, q < nr)
    y starts as the bias (or zeros).

Design. Every output element is stored by exactly one program, with no atomics and no zero-fill
pass (so the results are deterministic):

* ``_stage1_kernel``: one program per (row tile of one group, token tile). The row tiles are
  listed on the host (``tile_group``, ``tile_row``: a few ints per group, from the metadata the
  reference reads too). It walks the group's column range in chunks; the cyclic wrap is the index
  ``(s + c) mod n`` of the gathered columns. zt is feature-major (rows, T) as in the reference,
  stored in x's dtype.
* ``_stage2_kernel``: one program per (output-column tile, token tile). Groups may overlap
  (their unions are computed per group), so the program visits every group; for each it maps
  its columns j to the group's local index c = (j - s) mod m, keeps those with c < L, and runs
  the rank loop only when that set is non-empty (the loop bound is 0 otherwise). The middle rows
  are read straight through ``perm`` (no permuted copy of zt); bias is the accumulator's initial
  value; one store.
* The backward is the transposed product, so it reuses the two stages with transposed factor
  reads (``TRANSPOSED``): stage 1 over the out-groups gives gz2t = B_h^T gy, stage 2 over the
  in-groups with the inverse permutation gives gx = gzt A_g; ``_factor_grad_kernel`` computes
  each group's factor gradient (a product reduced over the tokens, one program per (group, row
  tile, column tile)).

Accumulation is in fp32 (``tl.dot`` with an fp32 accumulator); fp32 operands use IEEE dots unless
``torch.backends.cuda.matmul.allow_tf32`` is set (the Monarch kernels' rule,
``effnn.kernels.monarch._dot_flags``).

This module imports triton at the top and is only imported lazily by ``effnn.ops.gblr``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from effnn.kernels.monarch import _INTERPRET, _cast_out, _device_ctx, _dot_flags, _launch

__all__ = ["backward", "forward", "unsupported_reasons"]

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT32_MAX = 2**31 - 1

# (BLOCK_R, BLOCK_T, BLOCK_C): stage-1 rows, tokens, reduction chunk; stage 2 uses BLOCK_M output
# columns, BLOCK_T tokens and BLOCK_Q rank rows; the factor gradients BLOCK_R rows, BLOCK_C columns
# and BLOCK_T tokens per reduction chunk. Fixed tiles (the interpreter gets 16s).
if _INTERPRET:
    _S1, _S2, _FG, _WARPS = (16, 16, 16), (16, 16, 16), (16, 16, 16), 1
else:
    _S1, _S2, _FG, _WARPS = (32, 64, 64), (64, 64, 32), (32, 64, 64), 4


@triton.jit
def _stage1_kernel(
    x_ptr, a_ptr, meta_ptr, tile_group_ptr, tile_row_ptr, zt_ptr,
    T, N,
    TRANSPOSED: tl.constexpr, DOT_PREC: tl.constexpr, INTERP_BF16: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """zt[r0 + i, t] = sum_c A_g[i, c] * x[t, (s + c) mod N] for one row tile of group g; A_g is
    stored (nr, L), or (L, nr) when ``TRANSPOSED`` (an out-group's factor in the backward)."""
    tile = tl.program_id(0)
    pid_t = tl.program_id(1)
    g = tl.load(tile_group_ptr + tile)
    row0 = tl.load(tile_row_ptr + tile)
    s = tl.load(meta_ptr + g * 5)
    L = tl.load(meta_ptr + g * 5 + 1)
    r0 = tl.load(meta_ptr + g * 5 + 2)
    nr = tl.load(meta_ptr + g * 5 + 3)
    off = tl.load(meta_ptr + g * 5 + 4)

    rows = row0 + tl.arange(0, BLOCK_R)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    r_ok = rows < nr
    t_ok = offs_t < T
    tok = offs_t.to(tl.int64) * N
    offs_c = tl.arange(0, BLOCK_C)
    acc = tl.zeros((BLOCK_R, BLOCK_T), dtype=tl.float32)
    for c0 in range(0, L, BLOCK_C):
        cc = c0 + offs_c
        c_ok = cc < L
        if TRANSPOSED:
            a_idx = cc.to(tl.int64)[None, :] * nr + rows[:, None]
        else:
            a_idx = rows.to(tl.int64)[:, None] * L + cc[None, :]
        a = tl.load(a_ptr + off + a_idx, mask=r_ok[:, None] & c_ok[None, :], other=0.0)
        col = (s + cc) % N  # the cyclic range may wrap past the last column
        xt = tl.load(x_ptr + tok[None, :] + col[:, None], mask=c_ok[:, None] & t_ok[None, :], other=0.0)
        if INTERP_BF16:  # the interpreter's bf16 dot is wrong; bf16 products are exact in fp32
            a = a.to(tl.float32)
            xt = xt.to(tl.float32)
        acc = tl.dot(a, xt, acc, input_precision=DOT_PREC)
    out = zt_ptr + (r0 + rows).to(tl.int64)[:, None] * T + offs_t[None, :]
    tl.store(out, _cast_out(acc, zt_ptr.dtype.element_ty, INTERP_BF16), mask=r_ok[:, None] & t_ok[None, :])


@triton.jit
def _stage2_kernel(
    zt_ptr, perm_ptr, b_ptr, meta_ptr, bias_ptr, y_ptr,
    T, M, G,
    HAS_BIAS: tl.constexpr, TRANSPOSED: tl.constexpr, DOT_PREC: tl.constexpr, INTERP_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    """y[t, j] = bias[j] + sum over groups h covering j of sum_q zt[perm[r0 + q], t] *
    B_h[(j - s) mod M, q], for one (column tile, token tile); B_h is stored (L, nr), or (nr, L)
    when ``TRANSPOSED`` (an in-group's factor in the backward)."""
    pid_m = tl.program_id(0)
    pid_t = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    m_ok = offs_m < M
    t_ok = offs_t < T
    offs_q = tl.arange(0, BLOCK_Q)
    acc = tl.zeros((BLOCK_T, BLOCK_M), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_m, mask=m_ok, other=0.0).to(tl.float32)[None, :]
    for h in range(G):
        s = tl.load(meta_ptr + h * 5)
        L = tl.load(meta_ptr + h * 5 + 1)
        r0 = tl.load(meta_ptr + h * 5 + 2)
        nr = tl.load(meta_ptr + h * 5 + 3)
        off = tl.load(meta_ptr + h * 5 + 4)
        local = (offs_m - s + M) % M  # the column's index in the group's cyclic range
        cov = m_ok & (local < L)
        # groups that miss this tile get an empty rank loop
        nq = tl.where(tl.max(cov.to(tl.int32), axis=0) > 0, nr, 0)
        for q0 in range(0, nq, BLOCK_Q):
            qq = q0 + offs_q
            q_ok = qq < nr
            src = tl.load(perm_ptr + r0 + qq, mask=q_ok, other=0)
            z = tl.load(zt_ptr + src[None, :] * T + offs_t[:, None], mask=t_ok[:, None] & q_ok[None, :],
                        other=0.0)
            if TRANSPOSED:
                b_idx = qq.to(tl.int64)[:, None] * L + local[None, :]
            else:
                b_idx = local.to(tl.int64)[None, :] * nr + qq[:, None]
            b = tl.load(b_ptr + off + b_idx, mask=q_ok[:, None] & cov[None, :], other=0.0)
            if INTERP_BF16:
                z = z.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(z, b, acc, input_precision=DOT_PREC)
    out = y_ptr + offs_t.to(tl.int64)[:, None] * M + offs_m[None, :]
    tl.store(out, _cast_out(acc, y_ptr.dtype.element_ty, INTERP_BF16), mask=t_ok[:, None] & m_ok[None, :])


@triton.jit
def _factor_grad_kernel(
    zt_ptr, src_ptr, x_ptr, meta_ptr, tile_group_ptr, tile_row_ptr, tile_col_ptr, g_ptr,
    T, N,
    HAS_SRC: tl.constexpr, TRANSPOSED: tl.constexpr, DOT_PREC: tl.constexpr, INTERP_BF16: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """G_g[i, c] = sum_t zt[src[r0 + i], t] * x[t, (s + c) mod N] for one (row tile, column tile)
    of group g (src: a row permutation, or the identity without ``HAS_SRC``), stored at
    g_ptr + off as (nr, L), or (L, nr) when ``TRANSPOSED``."""
    tile = tl.program_id(0)
    g = tl.load(tile_group_ptr + tile)
    row0 = tl.load(tile_row_ptr + tile)
    col0 = tl.load(tile_col_ptr + tile)
    s = tl.load(meta_ptr + g * 5)
    L = tl.load(meta_ptr + g * 5 + 1)
    r0 = tl.load(meta_ptr + g * 5 + 2)
    nr = tl.load(meta_ptr + g * 5 + 3)
    off = tl.load(meta_ptr + g * 5 + 4)

    rows = row0 + tl.arange(0, BLOCK_R)
    cols = col0 + tl.arange(0, BLOCK_C)
    r_ok = rows < nr
    c_ok = cols < L
    if HAS_SRC:
        zrow = tl.load(src_ptr + r0 + rows, mask=r_ok, other=0)
    else:
        zrow = r0 + rows
    xcol = (s + cols) % N
    offs_t = tl.arange(0, BLOCK_T)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        tt = t0 + offs_t
        t_ok = tt < T
        z = tl.load(zt_ptr + zrow.to(tl.int64)[:, None] * T + tt[None, :], mask=r_ok[:, None] & t_ok[None, :],
                    other=0.0)
        xs = tl.load(x_ptr + tt.to(tl.int64)[:, None] * N + xcol[None, :], mask=t_ok[:, None] & c_ok[None, :],
                     other=0.0)
        if INTERP_BF16:
            z = z.to(tl.float32)
            xs = xs.to(tl.float32)
        acc = tl.dot(z, xs, acc, input_precision=DOT_PREC)
    if TRANSPOSED:
        g_idx = cols.to(tl.int64)[None, :] * nr + rows[:, None]
    else:
        g_idx = rows.to(tl.int64)[:, None] * L + cols[None, :]
    tl.store(g_ptr + off + g_idx, _cast_out(acc, g_ptr.dtype.element_ty, INTERP_BF16),
             mask=r_ok[:, None] & c_ok[None, :])


def unsupported_reasons(x: torch.Tensor, in_factor: torch.Tensor, out_factor: torch.Tensor) -> list[str]:
    """Why these kernels cannot serve x (T, in_features) with these factors; empty if they can.
    Device placement and triton availability are the dispatcher's business."""
    reasons = []
    if x.dtype not in _SUPPORTED_DTYPES:
        reasons.append(f"x.dtype={x.dtype} is not supported (float32, float16, bfloat16)")
    for name, t in (("in_factor", in_factor), ("out_factor", out_factor)):
        if t.numel() > _INT32_MAX:
            reasons.append(f"{name} has {t.numel()} elements, more than int32 indexing allows")
    if x.dim() == 2 and x.shape[0] > _INT32_MAX - 1024:
        reasons.append(f"T={x.shape[0]} tokens exceeds the int32 token index limit")
    return reasons


def _row_tiles(meta: torch.Tensor, block_r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(group index, first row within the group) of every stage-1 row tile."""
    groups, rows = [], []
    for g, (_, _, _, nr, _) in enumerate(meta.tolist()):
        for row0 in range(0, nr, block_r):
            groups.append(g)
            rows.append(row0)
    dev = meta.device
    return (torch.tensor(groups, dtype=torch.int64, device=dev),
            torch.tensor(rows, dtype=torch.int64, device=dev))


def _factor_tiles(meta: torch.Tensor, block_r: int, block_c: int) -> tuple[torch.Tensor, ...]:
    """(group index, first row, first column) of every tile of the groups' (nr, L) factors."""
    tiles = [(g, row0, col0) for g, (_, L, _, nr, _) in enumerate(meta.tolist())
             for row0 in range(0, nr, block_r) for col0 in range(0, L, block_c)]
    t = torch.tensor(tiles, dtype=torch.int64, device=meta.device).view(-1, 3)
    return t[:, 0].contiguous(), t[:, 1].contiguous(), t[:, 2].contiguous()


def forward(x, in_factor, in_meta, out_factor, out_meta, perm, bias, out_features: int,
            save_z: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(y (T, out_features), z2t (rows, T) if ``save_z`` else an empty tensor): the packed
    product of contiguous x (T, in_features), as ``_structured_forward_ref`` computes it."""
    T, n = x.shape
    m = out_features
    rows = perm.numel()
    x = x.contiguous()
    in_factor, out_factor = in_factor.contiguous(), out_factor.contiguous()
    in_meta, out_meta, perm = in_meta.contiguous(), out_meta.contiguous(), perm.contiguous()
    prec, interp_bf16 = _dot_flags(x.dtype, x.device)
    zt = x.new_empty(rows, T)
    y = x.new_empty(T, m)
    with _device_ctx(x):
        if T > 0 and rows > 0:
            br, bt, bc = _S1
            tile_group, tile_row = _row_tiles(in_meta, br)
            grid = (tile_group.numel(), triton.cdiv(T, bt))
            _launch(_stage1_kernel, grid, zt, x, in_factor, in_meta, tile_group, tile_row, zt, T, n,
                    TRANSPOSED=False, DOT_PREC=prec, INTERP_BF16=interp_bf16, BLOCK_R=br, BLOCK_T=bt, BLOCK_C=bc,
                    num_warps=_WARPS)
        if T > 0 and m > 0:
            bm, bt, bq = _S2
            grid = (triton.cdiv(m, bm), triton.cdiv(T, bt))
            _launch(_stage2_kernel, grid, y, zt, perm, out_factor, out_meta,
                    bias if bias is not None else y, y, T, m, out_meta.shape[0],
                    HAS_BIAS=bias is not None, TRANSPOSED=False, DOT_PREC=prec, INTERP_BF16=interp_bf16,
                    BLOCK_M=bm, BLOCK_T=bt, BLOCK_Q=bq, num_warps=_WARPS)
    z2t = zt.index_select(0, perm) if save_z else x.new_empty(0)
    return y, z2t


def backward(grad_y, x, z2t, in_factor, in_meta, out_factor, out_meta, perm,
             need_input_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x or an empty tensor, grad_in_factor, grad_out_factor), as
    ``gblr_structured_backward_ref`` computes them from the forward's permuted middle z2t."""
    T, n = x.shape
    m = grad_y.shape[1]
    rows = perm.numel()
    grad_y, x, z2t = grad_y.contiguous(), x.contiguous(), z2t.contiguous()
    in_factor, out_factor = in_factor.contiguous(), out_factor.contiguous()
    in_meta, out_meta, perm = in_meta.contiguous(), out_meta.contiguous(), perm.contiguous()
    prec, interp_bf16 = _dot_flags(x.dtype, x.device)
    inverse = torch.empty_like(perm)  # gzt[perm[j]] = gz2t[j]: gzt's row i is gz2t's row inverse[i]
    inverse[perm] = torch.arange(rows, device=perm.device)
    gz2t = x.new_empty(rows, T)
    g_in = torch.empty_like(in_factor)
    g_out = torch.empty_like(out_factor)
    gx = x.new_empty(T, n) if need_input_grad else x.new_empty(0)
    br, bt, bc = _S1
    with _device_ctx(x):
        if T > 0 and rows > 0:  # gz2t = B_h^T gy over the out-groups
            tile_group, tile_row = _row_tiles(out_meta, br)
            grid = (tile_group.numel(), triton.cdiv(T, bt))
            _launch(_stage1_kernel, grid, gz2t, grad_y, out_factor, out_meta, tile_group, tile_row, gz2t,
                    T, m, TRANSPOSED=True, DOT_PREC=prec, INTERP_BF16=interp_bf16, BLOCK_R=br,
                    BLOCK_T=bt, BLOCK_C=bc, num_warps=_WARPS)
        elif rows > 0:
            gz2t.zero_()
        if need_input_grad and T > 0 and n > 0:  # gx = gzt A_g over the in-groups
            bm, bt2, bq = _S2
            grid = (triton.cdiv(n, bm), triton.cdiv(T, bt2))
            _launch(_stage2_kernel, grid, gx, gz2t, inverse, in_factor, in_meta, gx, gx, T, n,
                    in_meta.shape[0], HAS_BIAS=False, TRANSPOSED=True, DOT_PREC=prec,
                    INTERP_BF16=interp_bf16, BLOCK_M=bm, BLOCK_T=bt2, BLOCK_Q=bq, num_warps=_WARPS)
        fr, fc, ft = _FG
        # in-group g: G[i, c] = sum_t gzt[r0 + i, t] x[t, (s + c) mod n], stored (nr, L)
        if in_factor.numel() > 0:
            tiles = _factor_tiles(in_meta, fr, fc)
            _launch(_factor_grad_kernel, (tiles[0].numel(),), g_in, gz2t, inverse, x, in_meta, *tiles,
                    g_in, T, n, HAS_SRC=True, TRANSPOSED=False, DOT_PREC=prec, INTERP_BF16=interp_bf16,
                    BLOCK_R=fr, BLOCK_C=fc, BLOCK_T=ft, num_warps=_WARPS)
        # out-group h: G[q, c] = sum_t z2t[r0 + q, t] gy[t, (s + c) mod m], stored (L, nr)
        if out_factor.numel() > 0:
            tiles = _factor_tiles(out_meta, fr, fc)
            _launch(_factor_grad_kernel, (tiles[0].numel(),), g_out, z2t, perm, grad_y, out_meta, *tiles,
                    g_out, T, m, HAS_SRC=False, TRANSPOSED=True, DOT_PREC=prec, INTERP_BF16=interp_bf16,
                    BLOCK_R=fr, BLOCK_C=fc, BLOCK_T=ft, num_warps=_WARPS)
    return gx, g_in, g_out
