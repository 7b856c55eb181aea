"""Triton kernels for window attention with sptr's contextual relative position terms (cubic
windows and SphereFormer's radial windows), forward and backward: the ``triton`` backend of
``effnn::window_attention``.

Semantics (the specification is ``window_attention_ref`` in ``effnn.ops.radial_window``). Points
are sorted by window; per window and head, with q multiplied by ``scale``::

    s[i, j]  = q_i . k_j + sum_a Pq_a[i, idx_a(i, j)] + Pk_a[j, idx_a(i, j)]
    Pq_a[i, r] = q_i . Tq[h, a, r],   Pk_a[j, r] = k_j . Tk[h, a, r]
    p[i, :]  = softmax_j s[i, :],      lse_i = log sum_j exp s[i, j]
    out_i    = sum_j p[i, j] v_j + sum_a sum_r H_a[i, r] Tv[h, a, r],
    H_a[i, r] = sum_{j: idx_a(i, j) = r} p[i, j]

with ``idx_a = c_i - c_j + L - 1`` on the linear axes (codes ``c`` in [0, L-1]) and
``idx_2 = clamp(exponential_split(r_i - r_j, a) + L, 0, 2L-1)`` on the range axis of radial
windows, evaluated per pair inside the kernels from the per-point codes and ranges (from the float
bits, in the dtype of the coordinates, as the reference does; fp32 divisions are IEEE-rounded).

Design. Python only partitions the points (``window_partition`` and the codes of the reference;
radial windows are further sorted by range inside each window, so that a tile's pairs span few
exponential bins) and lists the tiles of every window; the kernels read q, k, v in place through
the window order (strided views of a fused qkv projection need no copy) and write in the caller's
order. Per (tile, head) program:

* the table products of a tile's points are one small dot for the three axes (``q @ Tq^T``: tile
  x 4 * rows, the tables passed zero-padded in that "slot" layout), and the score and ``dO . T_v``
  terms of a pair are gathered from them (``tl.gather``, per axis) by the pair's row -- nothing of
  size pairs x head_dim exists, in memory or in registers;
* histograms of p (value term, ``dT_v``) and of dS (``dq``, ``dk``, ``dT_q``, ``dT_k``) over the
  table rows: on a linear axis ``idx`` is a shift of the key's (or query's) code, so the
  histogram is a dot with the one-hot codes (``p @ onehot(c_j)``: tile x L) accumulated over the
  key blocks and shifted per point once at the end; on the exponential axis one masked row sum per
  table row that the tile's pairs reach (a loop over that range);
* the value term, ``dq``'s and ``dk``'s table terms and the table gradients are then dots of those
  histograms with the tables / with q, k, dO.

Three kernels, as flash attention:

* ``_forward_kernel``      per (query tile of a window, head): the window's keys in blocks, online
                           softmax (the value histograms rescaled with the output); out and lse.
* ``_backward_dq_kernel``  same programs: delta = rowsum(dO * O) (stored for the next kernel), dq,
                           and this tile's share of dT_q (dS histogram x q) and dT_v (p histogram
                           x dO).
* ``_backward_dkv_kernel`` per (key tile of a window, head), over the window's queries in blocks:
                           dk, dv and the tile's share of dT_k. dq, dk and dv of a window are sums
                           within it, written once: deterministic, no atomics.

The table gradients are summed over all tiles of all windows with fp32 ``tl.atomic_add`` into an
fp32 buffer: their summation order (and so their last bits) varies from run to run on a GPU. Every
other output is deterministic.

Precision: fp32, fp16 and bf16 inputs are loaded and computed in fp32 (as the reference computes
half inputs), with IEEE fp32 dots unless ``torch.backends.cuda.matmul.allow_tf32`` is set;
outputs are rounded to the input dtype once. Tiles are 16 points with 8 warps (``_launch_shape``;
no autotuning: not run or timed on a GPU yet, only compiled for sm_90, where all three kernels
use 255 registers per thread without spills at head_dim 16 and L = 24, and spill at head_dim 64).

This module imports triton at the top and is only imported lazily by ``effnn.ops.radial_window``;
it never touches CUDA at import.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from effnn.kernels.monarch import _INTERPRET, _cast_out, _device_ctx, _dot_flags
from effnn.ops import radial_window as _op

__all__ = ["forward", "backward", "unsupported_reasons"]

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MIN_TILE = 16  # tl.dot needs tile dims >= 16; smaller sizes are handled by masks
_MAX_HEAD_DIM = 256  # a head's rows are held whole in registers
_MAX_HEADS = 65535  # heads are the second launch grid axis


def _launch_shape() -> tuple[int, int]:
    """(tile of points, num_warps). Not timed on a GPU: the smallest tile that tl.dot takes, with
    8 warps, the only shape for which the sm_90 build of all three kernels reports no register
    spills at SphereFormer's sizes (head_dim 16, L = 24; 255 registers per thread; 32-point tiles or
    4 warps spill). One warp under the interpreter."""
    return _MIN_TILE, 1 if _INTERPRET else 8


def _block(size: int) -> int:
    return max(_MIN_TILE, triton.next_power_of_2(size))


# --------------------------------------------------------------------------------------------
# helpers (inlined)
# --------------------------------------------------------------------------------------------
# The three axes share one tile: axis a's table rows (or, for the linear-axis histograms, codes)
# occupy columns a * BLOCK_R + r (a * BLOCK_L + m); a fourth, empty slot keeps the width a power
# of two. So each table product, one-hot code matrix and histogram is one dot for all axes. The
# tables come zero-padded in that layout, (heads, 4 * BLOCK_R, BLOCK_D), and so do the gradients.


@triton.jit
def _rows(ptr, pts, ok, h, s_n, s_h, s_d, D, BLOCK_D: tl.constexpr):
    """(len(pts), BLOCK_D) fp32 rows of head h of an (N, heads, D) tensor at caller rows pts."""
    offs_d = tl.arange(0, BLOCK_D)
    x = tl.load(ptr + pts[:, None] * s_n + h * s_h + offs_d[None, :] * s_d,
                mask=ok[:, None] & (offs_d < D)[None, :], other=0.0)
    return x.to(tl.float32)


@triton.jit
def _slots(h, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Offsets (4 * BLOCK_R, BLOCK_D) of head h's tile in a (heads, 4 * BLOCK_R, BLOCK_D) table."""
    return ((h * (4 * BLOCK_R) + tl.arange(0, 4 * BLOCK_R))[:, None] * BLOCK_D
            + tl.arange(0, BLOCK_D)[None, :])


@triton.jit
def _codes(codes_ptr, pos, ok):
    """The three codes ((N, 3) int32) of the points at window-order positions pos."""
    c0 = tl.load(codes_ptr + pos * 3, mask=ok, other=0)
    c1 = tl.load(codes_ptr + pos * 3 + 1, mask=ok, other=0)
    c2 = tl.load(codes_ptr + pos * 3 + 2, mask=ok, other=0)
    return c0, c1, c2


@triton.jit
def _exp_idx(ri, rj, two_a, a, L, R64: tl.constexpr):
    """(M, N) table rows clamp(exponential_split(r_i - r_j, a) + L, 0, 2L-1), computed as the
    reference does: the bin is 2 * (biased exponent) + (first mantissa bit) of
    x = (|rel| + 2a) / a, minus the bias; in the dtype of the coordinates."""
    rel = ri[:, None] - rj[None, :]
    if R64:
        x = (tl.abs(rel) + two_a) / a  # fp64 division is IEEE-rounded
        b = ((x.to(tl.int64, bitcast=True) >> 51) - 2048).to(tl.int32)
    else:
        x = tl.math.div_rn(tl.abs(rel) + two_a, a)  # fp32 `/` is not (div.full.f32)
        b = (x.to(tl.int32, bitcast=True) >> 22) - 256
    b = tl.where(rel < 0, -b - 1, b)
    return tl.minimum(tl.maximum(b + L, 0), 2 * L - 1)


@triton.jit
def _pair_idx(cq0, cq1, cq2, rq, ck0, ck1, ck2, rk, ab_ptr, L,
              EXP: tl.constexpr, R64: tl.constexpr):
    """The (M, N) table rows of the three axes of every pair: c_i - c_j + L - 1 (linear axes) or
    the exponential split (axis 2 of radial windows)."""
    i0 = cq0[:, None] - ck0[None, :] + (L - 1)
    i1 = cq1[:, None] - ck1[None, :] + (L - 1)
    if EXP:
        i2 = _exp_idx(rq, rk, tl.load(ab_ptr), tl.load(ab_ptr + 1), L, R64)
    else:
        i2 = cq2[:, None] - ck2[None, :] + (L - 1)
    return i0, i1, i2


@triton.jit
def _gather3(x, i0, i1, i2, AXIS: tl.constexpr, BLOCK_R: tl.constexpr):
    """sum_a x[i, a * BLOCK_R + idx_a] (AXIS 1: x (M, 4 * BLOCK_R), per query) or
    x[a * BLOCK_R + idx_a, j] (AXIS 0: x (4 * BLOCK_R, N), per key).

    The axes are split apart first and each gathered on its own: a gather's code grows with the
    width of its source (the sm_90 build spilled registers gathering from the whole tile)."""
    if AXIS == 1:
        y = tl.permute(tl.reshape(x, (x.shape[0], 2, 2, BLOCK_R)), (0, 3, 2, 1))
    else:
        y = tl.permute(tl.reshape(x, (2, 2, BLOCK_R, x.shape[1])), (2, 3, 1, 0))
    # y[.., .., s, t] is axis 2t + s
    lo, hi = tl.split(y)
    a0, a1 = tl.split(lo)
    a2, _ = tl.split(hi)
    return tl.gather(a0, i0, AXIS) + tl.gather(a1, i1, AXIS) + tl.gather(a2, i2, AXIS)


@triton.jit
def _onehot(c0, c1, c2, LIN: tl.constexpr, BLOCK_L: tl.constexpr):
    """(len(c), 4 * BLOCK_L) fp32 one-hot codes of the LIN linear axes in the slot layout."""
    col = tl.arange(0, 4 * BLOCK_L)
    a = (col // BLOCK_L)[None, :]
    c = tl.where(a == 0, c0[:, None], tl.where(a == 1, c1[:, None], c2[:, None]))
    return ((c == (col % BLOCK_L)[None, :]) & (a < LIN)).to(tl.float32)


@triton.jit
def _shift(hist, c0, c1, c2, L, KEY: tl.constexpr, LIN: tl.constexpr,
           BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr):
    """The linear axes' histograms over the other side's codes (X, 4 * BLOCK_L) -> over the table
    rows (X, 4 * BLOCK_R).

    Per query (KEY False): hist[i, m] = sum_j w[i, j] [c_j = m] and the row is c_i - m + L - 1,
    so out[i, r] = hist[i, c_i + L - 1 - r]. Per key: hist[j, m] = sum_i w[i, j] [c_i = m] and
    out[j, r] = hist[j, r + c_j - L + 1]. Codes off the histogram give 0."""
    col = tl.arange(0, 4 * BLOCK_R)
    a = (col // BLOCK_R)[None, :]
    r = (col % BLOCK_R)[None, :]
    c = tl.where(a == 0, c0[:, None], tl.where(a == 1, c1[:, None], c2[:, None]))
    if KEY:
        m = c - (L - 1) + r
    else:
        m = c + (L - 1) - r
    ok = (m >= 0) & (m < BLOCK_L) & (a < LIN)
    return tl.where(ok, tl.gather(hist, tl.where(ok, a * BLOCK_L + m, 0), 1), 0.0)


@triton.jit
def _hist(w, w2, idx, ok, AXIS: tl.constexpr, TWO: tl.constexpr, BLOCK_OUT: tl.constexpr,
          BLOCK_R: tl.constexpr):
    """Histograms of w (and, with TWO, of w2) (M, N) over the exponential axis' table rows
    idx (M, N), summed over AXIS (1: per query, 0: per key): (BLOCK_OUT, BLOCK_R) each. One masked
    sum per row that the pairs ``ok`` reach (few: the points are sorted by range within a
    window)."""
    rr = tl.arange(0, BLOCK_R)[None, :]
    lo = tl.min(tl.where(ok, idx, BLOCK_R))
    hi = tl.max(tl.where(ok, idx, -1))
    out = tl.zeros([BLOCK_OUT, BLOCK_R], dtype=tl.float32)
    out2 = tl.zeros([BLOCK_OUT, BLOCK_R], dtype=tl.float32)
    for r in range(lo, hi + 1):
        hit = idx == r
        col = rr == r
        out += tl.where(col, tl.sum(tl.where(hit, w, 0.0), AXIS)[:, None], 0.0)
        if TWO:
            out2 += tl.where(col, tl.sum(tl.where(hit, w2, 0.0), AXIS)[:, None], 0.0)
    return out, out2


@triton.jit
def _table_rows(lin, exp, c0, c1, c2, L, KEY: tl.constexpr, EXP: tl.constexpr,
                BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr):
    """The full histogram over the table rows (X, 4 * BLOCK_R): the linear axes' shifted, and the
    exponential axis' ``exp`` (X, BLOCK_R) placed in slot 2."""
    out = _shift(lin, c0, c1, c2, L, KEY, 2 if EXP else 3, BLOCK_L, BLOCK_R)
    if EXP:
        col = tl.arange(0, 4 * BLOCK_R)
        slot2 = ((col // BLOCK_R) == 2)[None, :]
        r = tl.where(slot2, (col % BLOCK_R)[None, :], 0) + tl.zeros_like(out).to(tl.int32)
        out += tl.where(slot2, tl.gather(exp, r, 1), 0.0)
    return out


@triton.jit
def _tile(tile_win_ptr, tile_row_ptr, starts_ptr, BLOCK: tl.constexpr):
    """Window-order positions of the program's tile, their mask and the window's bounds."""
    t = tl.program_id(0)
    w = tl.load(tile_win_ptr + t)
    w_start = tl.load(starts_ptr + w)
    w_end = tl.load(starts_ptr + w + 1)
    offs = tl.load(tile_row_ptr + t) + tl.arange(0, BLOCK)
    return offs, offs < w_end, w_start, w_end


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _forward_kernel(
    q_ptr, k_ptr, v_ptr, order_ptr, starts_ptr, tile_win_ptr, tile_row_ptr,
    codes_ptr, r_ptr, ab_ptr, tq_ptr, tk_ptr, tv_ptr, out_ptr, lse_ptr,
    HEADS, D, L, scale,
    sq_n, sq_h, sq_d, sk_n, sk_h, sk_d, sv_n, sv_h, sv_d,
    REL: tl.constexpr, EXP: tl.constexpr, R64: tl.constexpr,
    DOT_PREC: tl.constexpr, INTERP_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out (N, HEADS, D) and lse (N, HEADS), contiguous in the caller's order, of one query tile
    of one window and head h."""
    dtype = out_ptr.dtype.element_ty
    h = tl.program_id(1)
    offs_m, m_ok, w_start, w_end = _tile(tile_win_ptr, tile_row_ptr, starts_ptr, BLOCK_M)
    pts_m = tl.load(order_ptr + offs_m, mask=m_ok, other=0)
    q = _rows(q_ptr, pts_m, m_ok, h, sq_n, sq_h, sq_d, D, BLOCK_D) * scale
    if REL:
        cq0, cq1, cq2 = _codes(codes_ptr, offs_m, m_ok)
        rq = tl.load(r_ptr + offs_m, mask=m_ok & EXP, other=0.0)
        t_offs = _slots(h, BLOCK_R, BLOCK_D)
        pq = tl.dot(q, tl.trans(tl.load(tq_ptr + t_offs)), input_precision=DOT_PREC)
        tk = tl.load(tk_ptr + t_offs)
        # p's histograms: over the keys' codes (linear axes), over the rows (exponential axis);
        # rescaled with acc
        h_lin = tl.zeros([BLOCK_M, 4 * BLOCK_L], dtype=tl.float32)
        h_exp = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)

    # A finite start for the running max, so that exp(m_i - m_new) is 0 and never nan.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(w_start, w_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < w_end
        ok = m_ok[:, None] & n_ok[None, :]
        pts_n = tl.load(order_ptr + offs_n, mask=n_ok, other=0)
        k = _rows(k_ptr, pts_n, n_ok, h, sk_n, sk_h, sk_d, D, BLOCK_D)
        v = _rows(v_ptr, pts_n, n_ok, h, sv_n, sv_h, sv_d, D, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        if REL:
            ck0, ck1, ck2 = _codes(codes_ptr, offs_n, n_ok)
            rk = tl.load(r_ptr + offs_n, mask=n_ok & EXP, other=0.0)
            i0, i1, i2 = _pair_idx(cq0, cq1, cq2, rq, ck0, ck1, ck2, rk, ab_ptr, L, EXP, R64)
            pk = tl.dot(tk, tl.trans(k), input_precision=DOT_PREC)
            s += _gather3(pq, i0, i1, i2, 1, BLOCK_R) + _gather3(pk, i0, i1, i2, 0, BLOCK_R)
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PREC)
        if REL:
            oh = _onehot(ck0, ck1, ck2, 2 if EXP else 3, BLOCK_L)
            h_lin = h_lin * alpha[:, None] + tl.dot(p, oh, input_precision=DOT_PREC)
            if EXP:
                h_exp = h_exp * alpha[:, None] + _hist(p, p, i2, ok, 1, False, BLOCK_M, BLOCK_R)[0]
        m_i = m_new

    if REL:  # the value term: the mass per table row times T_v
        rows = _table_rows(h_lin, h_exp, cq0, cq1, cq2, L, False, EXP, BLOCK_L, BLOCK_R)
        acc += tl.dot(rows, tl.load(tv_ptr + t_offs), input_precision=DOT_PREC)
    acc = acc / l_i[:, None]
    offs_d = tl.arange(0, BLOCK_D)
    row = pts_m * HEADS + h
    tl.store(out_ptr + row[:, None] * D + offs_d[None, :], _cast_out(acc, dtype, INTERP_BF16),
             mask=m_ok[:, None] & (offs_d < D)[None, :])
    tl.store(lse_ptr + row, m_i + tl.log(l_i), mask=m_ok)


@triton.jit
def _backward_dq_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, do_ptr, lse_ptr, delta_ptr,
    order_ptr, starts_ptr, tile_win_ptr, tile_row_ptr,
    codes_ptr, r_ptr, ab_ptr, tq_ptr, tk_ptr, tv_ptr, dq_ptr, dtq_ptr, dtv_ptr,
    HEADS, D, L, scale,
    sq_n, sq_h, sq_d, sk_n, sk_h, sk_d, sv_n, sv_h, sv_d, so_n, so_h, so_d, sg_n, sg_h, sg_d,
    REL: tl.constexpr, EXP: tl.constexpr, R64: tl.constexpr,
    DOT_PREC: tl.constexpr, INTERP_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """dq (N, HEADS, D) of one query tile of one window and head h; stores delta = rowsum(dO * O)
    (N, HEADS) for the dK/dV kernel and adds the tile's shares of dT_q and dT_v."""
    dtype = dq_ptr.dtype.element_ty
    h = tl.program_id(1)
    offs_m, m_ok, w_start, w_end = _tile(tile_win_ptr, tile_row_ptr, starts_ptr, BLOCK_M)
    pts_m = tl.load(order_ptr + offs_m, mask=m_ok, other=0)
    q = _rows(q_ptr, pts_m, m_ok, h, sq_n, sq_h, sq_d, D, BLOCK_D) * scale
    do = _rows(do_ptr, pts_m, m_ok, h, sg_n, sg_h, sg_d, D, BLOCK_D)
    delta = tl.sum(do * _rows(out_ptr, pts_m, m_ok, h, so_n, so_h, so_d, D, BLOCK_D), 1)
    row = pts_m * HEADS + h
    tl.store(delta_ptr + row, delta, mask=m_ok)
    lse = tl.load(lse_ptr + row, mask=m_ok, other=0.0)
    if REL:
        cq0, cq1, cq2 = _codes(codes_ptr, offs_m, m_ok)
        rq = tl.load(r_ptr + offs_m, mask=m_ok & EXP, other=0.0)
        t_offs = _slots(h, BLOCK_R, BLOCK_D)
        pq = tl.dot(q, tl.trans(tl.load(tq_ptr + t_offs)), input_precision=DOT_PREC)
        g = tl.dot(do, tl.trans(tl.load(tv_ptr + t_offs)), input_precision=DOT_PREC)
        tk = tl.load(tk_ptr + t_offs)
        # histograms of dS (-> dq, dT_q) and of p (-> dT_v), as the forward's
        ds_lin = tl.zeros([BLOCK_M, 4 * BLOCK_L], dtype=tl.float32)
        p_lin = tl.zeros([BLOCK_M, 4 * BLOCK_L], dtype=tl.float32)
        ds_exp = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        p_exp = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(w_start, w_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < w_end
        ok = m_ok[:, None] & n_ok[None, :]
        pts_n = tl.load(order_ptr + offs_n, mask=n_ok, other=0)
        k = _rows(k_ptr, pts_n, n_ok, h, sk_n, sk_h, sk_d, D, BLOCK_D)
        v = _rows(v_ptr, pts_n, n_ok, h, sv_n, sv_h, sv_d, D, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        if REL:
            ck0, ck1, ck2 = _codes(codes_ptr, offs_n, n_ok)
            rk = tl.load(r_ptr + offs_n, mask=n_ok & EXP, other=0.0)
            i0, i1, i2 = _pair_idx(cq0, cq1, cq2, rq, ck0, ck1, ck2, rk, ab_ptr, L, EXP, R64)
            pk = tl.dot(tk, tl.trans(k), input_precision=DOT_PREC)
            s += _gather3(pq, i0, i1, i2, 1, BLOCK_R) + _gather3(pk, i0, i1, i2, 0, BLOCK_R)
            dp += _gather3(g, i0, i1, i2, 1, BLOCK_R)
        p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds, k, input_precision=DOT_PREC)
        if REL:
            oh = _onehot(ck0, ck1, ck2, 2 if EXP else 3, BLOCK_L)
            ds_lin += tl.dot(ds, oh, input_precision=DOT_PREC)
            p_lin += tl.dot(p, oh, input_precision=DOT_PREC)
            if EXP:
                ds_part, p_part = _hist(ds, p, i2, ok, 1, True, BLOCK_M, BLOCK_R)
                ds_exp += ds_part
                p_exp += p_part

    if REL:
        # dPq per table row: dq through T_q and dT_q = dPq^T q; the p mass: dT_v = mass^T dO
        ds_rows = _table_rows(ds_lin, ds_exp, cq0, cq1, cq2, L, False, EXP, BLOCK_L, BLOCK_R)
        p_rows = _table_rows(p_lin, p_exp, cq0, cq1, cq2, L, False, EXP, BLOCK_L, BLOCK_R)
        dq += tl.dot(ds_rows, tl.load(tq_ptr + t_offs), input_precision=DOT_PREC)
        tl.atomic_add(dtq_ptr + t_offs, tl.dot(tl.trans(ds_rows), q, input_precision=DOT_PREC))
        tl.atomic_add(dtv_ptr + t_offs, tl.dot(tl.trans(p_rows), do, input_precision=DOT_PREC))
    dq *= scale
    offs_d = tl.arange(0, BLOCK_D)
    tl.store(dq_ptr + row[:, None] * D + offs_d[None, :], _cast_out(dq, dtype, INTERP_BF16),
             mask=m_ok[:, None] & (offs_d < D)[None, :])


@triton.jit
def _backward_dkv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr,
    order_ptr, starts_ptr, tile_win_ptr, tile_row_ptr,
    codes_ptr, r_ptr, ab_ptr, tq_ptr, tk_ptr, tv_ptr, dk_ptr, dv_ptr, dtk_ptr,
    HEADS, D, L, scale,
    sq_n, sq_h, sq_d, sk_n, sk_h, sk_d, sv_n, sv_h, sv_d, sg_n, sg_h, sg_d,
    REL: tl.constexpr, EXP: tl.constexpr, R64: tl.constexpr,
    DOT_PREC: tl.constexpr, INTERP_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """dk and dv (N, HEADS, D) of one key tile of one window and head h, summed over the window's
    queries in blocks (a fixed order); adds the tile's share of dT_k."""
    dtype = dk_ptr.dtype.element_ty
    h = tl.program_id(1)
    offs_n, n_ok, w_start, w_end = _tile(tile_win_ptr, tile_row_ptr, starts_ptr, BLOCK_N)
    pts_n = tl.load(order_ptr + offs_n, mask=n_ok, other=0)
    k = _rows(k_ptr, pts_n, n_ok, h, sk_n, sk_h, sk_d, D, BLOCK_D)
    v = _rows(v_ptr, pts_n, n_ok, h, sv_n, sv_h, sv_d, D, BLOCK_D)
    if REL:
        ck0, ck1, ck2 = _codes(codes_ptr, offs_n, n_ok)
        rk = tl.load(r_ptr + offs_n, mask=n_ok & EXP, other=0.0)
        t_offs = _slots(h, BLOCK_R, BLOCK_D)
        pk = tl.dot(tl.load(tk_ptr + t_offs), tl.trans(k), input_precision=DOT_PREC)
        # dS histograms over the queries' codes (linear axes) and the rows (exponential axis)
        h_lin = tl.zeros([BLOCK_N, 4 * BLOCK_L], dtype=tl.float32)
        h_exp = tl.zeros([BLOCK_N, BLOCK_R], dtype=tl.float32)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for m0 in range(w_start, w_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < w_end
        ok = m_ok[:, None] & n_ok[None, :]
        pts_m = tl.load(order_ptr + offs_m, mask=m_ok, other=0)
        q = _rows(q_ptr, pts_m, m_ok, h, sq_n, sq_h, sq_d, D, BLOCK_D) * scale
        do = _rows(do_ptr, pts_m, m_ok, h, sg_n, sg_h, sg_d, D, BLOCK_D)
        row = pts_m * HEADS + h
        lse = tl.load(lse_ptr + row, mask=m_ok, other=0.0)
        delta = tl.load(delta_ptr + row, mask=m_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        if REL:
            cq0, cq1, cq2 = _codes(codes_ptr, offs_m, m_ok)
            rq = tl.load(r_ptr + offs_m, mask=m_ok & EXP, other=0.0)
            i0, i1, i2 = _pair_idx(cq0, cq1, cq2, rq, ck0, ck1, ck2, rk, ab_ptr, L, EXP, R64)
            pq = tl.dot(q, tl.trans(tl.load(tq_ptr + t_offs)), input_precision=DOT_PREC)
            g = tl.dot(do, tl.trans(tl.load(tv_ptr + t_offs)), input_precision=DOT_PREC)
            s += _gather3(pq, i0, i1, i2, 1, BLOCK_R) + _gather3(pk, i0, i1, i2, 0, BLOCK_R)
            dp += _gather3(g, i0, i1, i2, 1, BLOCK_R)
        p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
        ds = p * (dp - delta[:, None])
        dv += tl.dot(tl.trans(p), do, input_precision=DOT_PREC)
        dk += tl.dot(tl.trans(ds), q, input_precision=DOT_PREC)
        if REL:
            oh = _onehot(cq0, cq1, cq2, 2 if EXP else 3, BLOCK_L)
            h_lin += tl.dot(tl.trans(ds), oh, input_precision=DOT_PREC)
            if EXP:
                h_exp += _hist(ds, ds, i2, ok, 0, False, BLOCK_N, BLOCK_R)[0]

    if REL:  # dPk per table row: dk through T_k and dT_k = dPk^T k
        rows = _table_rows(h_lin, h_exp, ck0, ck1, ck2, L, True, EXP, BLOCK_L, BLOCK_R)
        dk += tl.dot(rows, tl.load(tk_ptr + t_offs), input_precision=DOT_PREC)
        tl.atomic_add(dtk_ptr + t_offs, tl.dot(tl.trans(rows), k, input_precision=DOT_PREC))
    offs_d = tl.arange(0, BLOCK_D)
    row_n = pts_n * HEADS + h
    mask = n_ok[:, None] & (offs_d < D)[None, :]
    offs = row_n[:, None] * D + offs_d[None, :]
    tl.store(dk_ptr + offs, _cast_out(dk, dtype, INTERP_BF16), mask=mask)
    tl.store(dv_ptr + offs, _cast_out(dv, dtype, INTERP_BF16), mask=mask)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------


class _Plan:
    """The windows and position data of one call, in window order: ``order`` (window order ->
    caller row), ``starts`` (W + 1 window offsets), the codes (N, 3) int32, the ranges (exponential
    axis) and [2a, a] in the dtype of the coordinates, the tables in the kernels' zero-padded fp32
    slot layout, and the kernels' flags and block sizes."""

    def __init__(self, q, coords, batch, table_q, table_k, table_v, window_size, quant_size,
                 exp_split_a, origin):
        order, window, counts = _op.window_partition(coords, batch, window_size, origin)
        self.rel = table_q is not None
        self.exp = self.rel and exp_split_a is not None
        dummy = order  # a valid pointer that the kernels never read when a flag is off
        self.codes, self.r, self.ab, self.tables = dummy, dummy, dummy, (dummy,) * 3
        self.heads, self.D = q.shape[1], q.shape[2]
        self.L, self.R = 1, 1
        if self.rel:
            self.L = _op.quant_grid_length(window_size[0], quant_size[0])
            self.R = table_q.shape[0]
        self.block_d, self.block_l, self.block_r = _block(self.D), _block(self.L), _block(self.R)
        if self.rel:
            self.tables = tuple(self._slot_layout(t) for t in (table_q, table_k, table_v))
        if self.exp:
            # by range within each window (stable sorts: windows stay contiguous and in order),
            # so that a tile's pairs reach few exponential bins
            by_r = torch.argsort(coords[order, 2], stable=True)
            by_r = by_r[torch.argsort(window[by_r], stable=True)]
            order = order[by_r]
            self.r = coords[order, 2].contiguous()
            self.ab = torch.tensor([2 * exp_split_a, exp_split_a], dtype=coords.dtype,
                                   device=coords.device)
        if self.rel:
            codes = _op._codes(coords, window_size, quant_size, self.L, origin)
            self.codes = codes[order].int().contiguous()
        self.order = order
        self.counts = counts
        self.starts = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
        prec = _dot_flags(torch.float32, q.device)[0]  # every dot is fp32
        self.block, warps = _launch_shape()
        self.flags = dict(
            REL=self.rel, EXP=self.exp, R64=self.exp and coords.dtype == torch.float64,
            DOT_PREC=prec, INTERP_BF16=_INTERPRET and q.dtype == torch.bfloat16,
            BLOCK_M=self.block, BLOCK_N=self.block, BLOCK_D=self.block_d,
            BLOCK_L=self.block_l, BLOCK_R=self.block_r, num_warps=warps,
        )

    def _slot_layout(self, table):
        """(R, 3, heads, D) -> fp32 (heads, 4 * BLOCK_R, BLOCK_D), zero-padded: axis a's row r
        at a * BLOCK_R + r."""
        out = table.new_zeros((self.heads, 4, self.block_r, self.block_d), dtype=torch.float32)
        out[:, :3, :self.R, :self.D] = table.permute(2, 1, 0, 3)
        return out

    def from_slot_layout(self, grad, table):
        """A gradient in the slot layout -> (R, 3, heads, D) in ``table``'s dtype."""
        return grad[:, :3, :self.R, :self.D].permute(2, 1, 0, 3).contiguous().to(table.dtype)

    def tiles(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(window, first window-order position) of every tile of ``self.block`` points."""
        per = (self.counts + self.block - 1) // self.block
        win = torch.repeat_interleave(torch.arange(per.numel(), device=per.device), per)
        first = (torch.cumsum(per, 0) - per)[win]
        tile = torch.arange(win.numel(), device=per.device) - first  # within its window
        rows = self.starts[win] + tile * self.block
        return win.int(), rows

    def common(self):
        return (self.order, self.starts, *self.tiles(), self.codes, self.r, self.ab, *self.tables)

    def shape(self, scale):
        return (self.heads, self.D, self.L, float(scale))


def forward(q, k, v, coords, batch, table_q, table_k, table_v, window_size, quant_size,
            exp_split_a, origin, scale):
    """``(out, lse)`` as ``window_attention_ref`` returns them: out (N, heads, D) contiguous in q's
    dtype, lse (N, heads) float32. q, k, v may have any strides; N > 0."""
    plan = _Plan(q, coords, batch, table_q, table_k, table_v, window_size, quant_size,
                 exp_split_a, origin)
    N, heads, D = q.shape
    out = torch.empty((N, heads, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((N, heads), dtype=torch.float32, device=q.device)
    common = plan.common()
    with _device_ctx(q):
        _forward_kernel[(common[2].numel(), heads)](
            q, k, v, *common, out, lse, *plan.shape(scale),
            *q.stride(), *k.stride(), *v.stride(), **plan.flags,
        )
    return out, lse


def backward(grad_out, q, k, v, out, lse, coords, batch, table_q, table_k, table_v, window_size,
             quant_size, exp_split_a, origin, scale):
    """The gradients of q, k, v and of the three tables (None without tables), as
    ``window_attention_backward_ref`` returns them, in the inputs' dtypes."""
    plan = _Plan(q, coords, batch, table_q, table_k, table_v, window_size, quant_size,
                 exp_split_a, origin)
    N, heads, D = q.shape
    lse = lse.to(torch.float32).contiguous()
    delta = torch.empty_like(lse)
    grad_q = torch.empty((N, heads, D), dtype=q.dtype, device=q.device)
    grad_k = torch.empty((N, heads, D), dtype=k.dtype, device=k.device)
    grad_v = torch.empty((N, heads, D), dtype=v.dtype, device=v.device)
    # fp32 table gradients in the kernels' slot layout, summed with atomics
    dtq, dtk, dtv = (torch.zeros_like(t) if plan.rel else delta for t in plan.tables)
    common = plan.common()
    grid = (common[2].numel(), heads)  # the same tiles for queries and keys (BLOCK_M == BLOCK_N)
    strides = (*q.stride(), *k.stride(), *v.stride())
    with _device_ctx(q):
        _backward_dq_kernel[grid](
            q, k, v, out, grad_out, lse, delta, *common, grad_q, dtq, dtv, *plan.shape(scale),
            *strides, *out.stride(), *grad_out.stride(), **plan.flags,
        )
        _backward_dkv_kernel[grid](
            q, k, v, grad_out, lse, delta, *common, grad_k, grad_v, dtk, *plan.shape(scale),
            *strides, *grad_out.stride(), **plan.flags,
        )
    tables = (None, None, None)
    if plan.rel:
        tables = tuple(plan.from_slot_layout(g, t)
                       for g, t in ((dtq, table_q), (dtk, table_k), (dtv, table_v)))
    return grad_q, grad_k, grad_v, *tables


def unsupported_reasons(q) -> list[str]:
    """Why these kernels cannot serve the op's inputs (empty if they can). Device placement and
    triton availability are the dispatcher's business, not checked here."""
    reasons = []
    if q.dtype not in _SUPPORTED_DTYPES:
        reasons.append(f"dtype {q.dtype} is not supported (float32, float16, bfloat16)")
    if q.dim() == 3:
        if q.shape[2] > _MAX_HEAD_DIM:
            reasons.append(f"head_dim {q.shape[2]} exceeds {_MAX_HEAD_DIM}")
        if q.shape[1] > _MAX_HEADS:
            reasons.append(f"{q.shape[1]} heads exceed {_MAX_HEADS} (a launch grid axis)")
    return reasons
