"""Triton kernels for the routed attention of BiFormer's bi-level routing attention (level 2 of
``effnn.ops.routing_attention.routed_attention``), forward and backward.

Semantics (the op's specification, ``routed_attention_ref``), per image n, query region p, head h::

    keys of p    = the Tk tokens of each routed region r_idx[n, p, j], j = 0 .. topk-1, in order
    a[t, u]      = scale * q[n, p, t, h] . k[n, r_idx[n, p, j], s, h]        (u = j * Tk + s)
    logit[t, u]  = w_j * a[t, u]   (w_j = r_weight[n, p, j], soft routing; else 1),
                   -inf where key_valid[r_idx[n, p, j], s] is False
    out[n, p, t, h] = sum_u softmax_u(logit[t, :]) * w_j * v[n, r_idx[n, p, j], s, h]
    lse[n, p, h, t] = logsumexp_u logit[t, u]

Design. The routed regions are never copied: the routed keys of a query region are the
``topk * Tk`` rows u of a virtual gathered matrix, and a key tile is loaded row by row through
``r_idx`` (row u lives in region ``r_idx[n, p, u // Tk]``, token ``u % Tk``). Tiles therefore
span region borders, so regions of a few tokens (BiFormer's stage 3 has 2x2-token regions) still
fill a whole tile. Three kernels:

* ``_forward_kernel``   one program per (query region, head, query tile): flash attention over
                        the gathered key rows (online softmax, fp32 accumulators); writes out, lse.
* ``_backward_dq_kernel``  same programs: delta = rowsum(dO * O) (stored for the next kernel),
                        dQ, and per-key-row partial sums of the routing weight gradient
                        (reduced afterwards with torch: deterministic, no atomics).
* ``_backward_dkv_kernel`` one program per (key region, head, key tile): dK and dV summed over
                        every (query region, slot) that routed to the key region. Those pairs come
                        from inverse routing lists (a stable sort of r_idx, ``_inverse_routing``),
                        so each key tile is written once: no S^2 buffer, no atomics, and the sum
                        runs in a fixed order (deterministic). Its query rows are gathered the
                        same way as the forward's keys (row u: list entry u // Tq, token u % Tq).

The gradient of the routing weights: with a = scale * q.k (unweighted) and dp = dO . v
(unweighted), d logit = p * (w * dp - delta), so dw_j = sum over t and s in slot j of
(d logit * a + p * dp) (the first term through the keys, the second through the values).

Accumulation is in fp32; the probabilities and logit gradients are rounded to the input dtype
before their matmuls, as flash attention does. fp32 inputs use IEEE fp32 dots unless
``torch.backends.cuda.matmul.allow_tf32`` is set. Block sizes are fixed by dtype and head size
(``_launch_shape``; no autotuning: not timed on a GPU yet); under the interpreter the tiles are 16
wide, so small test shapes already cross tile and region borders.

This module imports triton at the top and is only imported lazily by
``effnn.ops.routing_attention``; it never touches CUDA at import.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# The interpreter flag, the bf16 workarounds of the interpreter, the dot precision choice and the
# device context are the Monarch kernels' (one place for them).
from effnn.kernels.monarch import _INTERPRET, _cast_out, _device_ctx, _dot_flags

__all__ = ["forward", "backward", "unsupported_reasons"]

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT32_MAX = 2**31 - 1
_MIN_TILE = 16  # tl.dot needs tile dims >= 16; smaller sizes are handled by masks
_MAX_HEAD_DIM = 256  # a head's q/k and v rows are held whole in registers


def _launch_shape(dtype: torch.dtype, head_block: int) -> tuple[int, int]:
    """(largest tile, num_warps). Chosen so that the kernels compiled ahead of time for sm_90
    (triton.compile, no GPU needed) report no register spills for head sizes up to 64 (BiFormer's
    are 32); not timed on a GPU. fp32 needs smaller tiles: its IEEE dots run on FMA units with
    larger register fragments. Under the interpreter tiles are 16 wide, so that small test shapes
    span several tiles."""
    if _INTERPRET:
        return _MIN_TILE, 1
    if dtype != torch.float32 and head_block <= 64:
        return 64, 4 if head_block <= 32 else 8
    return 32, 4 if head_block <= 32 else 8


def _tile(size: int, largest: int) -> int:
    return min(largest, max(_MIN_TILE, triton.next_power_of_2(size)))


def _head_block(size: int) -> int:
    return max(_MIN_TILE, triton.next_power_of_2(size))


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _widen(x, INTERP_BF16: tl.constexpr):
    """A loaded tile as a tl.dot operand (the interpreter's bf16 dot needs fp32 operands)."""
    if INTERP_BF16:
        return x.to(tl.float32)
    else:
        return x


@triton.jit
def _operand(x, dtype: tl.constexpr, INTERP_BF16: tl.constexpr):
    """An fp32 tile rounded to the input dtype for a tl.dot, as flash attention rounds P and dS."""
    if INTERP_BF16:
        return _cast_out(x, dtype, True).to(tl.float32)
    else:
        return x.to(dtype)


@triton.jit
def _routed_rows(idx_ptr, g, u, U_OK, T, TOPK):
    """Region and token of gathered key rows u of query region g (global n * P + p)."""
    j = u // T
    region = tl.load(idx_ptr + g.to(tl.int64) * TOPK + j, mask=U_OK, other=0)
    return j, region, u % T


@triton.jit
def _forward_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, w_ptr, valid_ptr, out_ptr, lse_ptr,
    P, TQ, TK, TOPK, HEADS, DQK, DV, scale,
    sq_n, sq_p, sq_t, sq_c,
    sk_n, sk_p, sk_t, sk_c,
    sv_n, sv_p, sv_t, sv_c,
    HAS_WEIGHT: tl.constexpr, HAS_VALID: tl.constexpr,
    DOT_PREC: tl.constexpr, INTERP_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """out and lse of one query tile of one head of query region g = n * P + p; out and lse are
    contiguous (N, P, TQ, HEADS * DV) and (N, P, HEADS, TQ)."""
    dtype = q_ptr.dtype.element_ty
    pid = tl.program_id(0)
    num_m = tl.cdiv(TQ, BLOCK_M)
    tile = pid % num_m
    h = (pid // num_m) % HEADS
    g = pid // (num_m * HEADS)
    n = (g // P).to(tl.int64)
    p = (g % P).to(tl.int64)

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < TQ
    offs_dq = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    dq_ok = offs_dq < DQK
    dv_ok = offs_dv < DV
    q = tl.load(q_ptr + n * sq_n + p * sq_p + offs_m[:, None] * sq_t
                + (h * DQK + offs_dq)[None, :] * sq_c,
                mask=m_ok[:, None] & dq_ok[None, :], other=0.0)
    q = _widen(q, INTERP_BF16)
    k_base = k_ptr + n * sk_n + (h * DQK + offs_dq)[:, None] * sk_c
    v_base = v_ptr + n * sv_n + (h * DV + offs_dv)[None, :] * sv_c

    # A finite start for the running max: a row whose keys in a tile are all masked (-inf) then
    # gets exp(-inf) = 0 instead of exp(-inf - -inf) = nan.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    n_keys = TOPK * TK
    for u0 in range(0, n_keys, BLOCK_N):
        u = u0 + tl.arange(0, BLOCK_N)
        u_ok = u < n_keys
        j, region, s = _routed_rows(idx_ptr, g, u, u_ok, TK, TOPK)
        row_k = region * sk_p + s * sk_t  # the gather, fused into the tile's pointers
        kt = tl.load(k_base + row_k[None, :], mask=dq_ok[:, None] & u_ok[None, :], other=0.0)
        logits = tl.dot(q, _widen(kt, INTERP_BF16), input_precision=DOT_PREC) * scale
        keep = u_ok
        if HAS_VALID:
            keep = keep & (tl.load(valid_ptr + region * TK + s, mask=u_ok, other=0) != 0)
        if HAS_WEIGHT:  # soft routing: keys times w_j scale the logits, values times w_j the output
            w = tl.load(w_ptr + g.to(tl.int64) * TOPK + j, mask=u_ok, other=0.0).to(tl.float32)
            logits *= w[None, :]
        logits = tl.where(keep[None, :], logits, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(logits, 1))
        alpha = tl.exp(m_i - m_new)
        prob = tl.exp(logits - m_new[:, None])
        l_i = l_i * alpha + tl.sum(prob, 1)
        if HAS_WEIGHT:
            prob *= w[None, :]
        row_v = region * sv_p + s * sv_t
        vt = tl.load(v_base + row_v[:, None], mask=u_ok[:, None] & dv_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(_operand(prob, dtype, INTERP_BF16),
                                            _widen(vt, INTERP_BF16), input_precision=DOT_PREC)
        m_i = m_new

    acc = acc / l_i[:, None]
    out_row = (g.to(tl.int64) * TQ + offs_m) * (HEADS * DV)
    tl.store(out_ptr + out_row[:, None] + (h * DV + offs_dv)[None, :],
             _cast_out(acc, dtype, INTERP_BF16), mask=m_ok[:, None] & dv_ok[None, :])
    lse_row = (g.to(tl.int64) * HEADS + h) * TQ
    tl.store(lse_ptr + lse_row + offs_m, m_i + tl.log(l_i), mask=m_ok)


@triton.jit
def _backward_dq_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, do_ptr, idx_ptr, w_ptr, valid_ptr, lse_ptr,
    delta_ptr, dq_ptr, dw_ptr,
    P, TQ, TK, TOPK, HEADS, DQK, DV, scale,
    sq_n, sq_p, sq_t, sq_c,
    sk_n, sk_p, sk_t, sk_c,
    sv_n, sv_p, sv_t, sv_c,
    so_n, so_p, so_t, so_c,
    sd_n, sd_p, sd_t, sd_c,
    HAS_WEIGHT: tl.constexpr, HAS_VALID: tl.constexpr, NEED_WEIGHT_GRAD: tl.constexpr,
    DOT_PREC: tl.constexpr, INTERP_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dQ of one query tile of one head of query region g; also stores delta = rowsum(dO * O)
    (N, P, HEADS, TQ) for the dK/dV kernel and, with NEED_WEIGHT_GRAD, this tile's share of the
    routing weight gradient per gathered key row u: dw_ptr[g, h, tile, u]."""
    dtype = q_ptr.dtype.element_ty
    pid = tl.program_id(0)
    num_m = tl.cdiv(TQ, BLOCK_M)
    tile = pid % num_m
    h = (pid // num_m) % HEADS
    g = pid // (num_m * HEADS)
    n = (g // P).to(tl.int64)
    p = (g % P).to(tl.int64)

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < TQ
    offs_dq = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    dq_ok = offs_dq < DQK
    dv_ok = offs_dv < DV
    q = tl.load(q_ptr + n * sq_n + p * sq_p + offs_m[:, None] * sq_t
                + (h * DQK + offs_dq)[None, :] * sq_c,
                mask=m_ok[:, None] & dq_ok[None, :], other=0.0)
    q = _widen(q, INTERP_BF16)
    mv = m_ok[:, None] & dv_ok[None, :]
    do = tl.load(do_ptr + n * sd_n + p * sd_p + offs_m[:, None] * sd_t
                 + (h * DV + offs_dv)[None, :] * sd_c, mask=mv, other=0.0)
    o = tl.load(out_ptr + n * so_n + p * so_p + offs_m[:, None] * so_t
                + (h * DV + offs_dv)[None, :] * so_c, mask=mv, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    lse_row = (g.to(tl.int64) * HEADS + h) * TQ + offs_m
    tl.store(delta_ptr + lse_row, delta, mask=m_ok)
    lse = tl.load(lse_ptr + lse_row, mask=m_ok, other=0.0)
    do = _widen(do, INTERP_BF16)
    k_base = k_ptr + n * sk_n + (h * DQK + offs_dq)[:, None] * sk_c
    v_base = v_ptr + n * sv_n + (h * DV + offs_dv)[:, None] * sv_c

    dq = tl.zeros([BLOCK_M, BLOCK_DQK], dtype=tl.float32)
    n_keys = TOPK * TK
    for u0 in range(0, n_keys, BLOCK_N):
        u = u0 + tl.arange(0, BLOCK_N)
        u_ok = u < n_keys
        j, region, s = _routed_rows(idx_ptr, g, u, u_ok, TK, TOPK)
        kt = tl.load(k_base + (region * sk_p + s * sk_t)[None, :],
                     mask=dq_ok[:, None] & u_ok[None, :], other=0.0)
        kt = _widen(kt, INTERP_BF16)
        vt = tl.load(v_base + (region * sv_p + s * sv_t)[None, :],
                     mask=dv_ok[:, None] & u_ok[None, :], other=0.0)
        a = tl.dot(q, kt, input_precision=DOT_PREC) * scale  # unweighted scaled logits
        dp = tl.dot(do, _widen(vt, INTERP_BF16), input_precision=DOT_PREC)  # dO . v, unweighted
        keep = u_ok
        if HAS_VALID:
            keep = keep & (tl.load(valid_ptr + region * TK + s, mask=u_ok, other=0) != 0)
        keep = m_ok[:, None] & keep[None, :]
        if HAS_WEIGHT:
            w = tl.load(w_ptr + g.to(tl.int64) * TOPK + j, mask=u_ok, other=0.0).to(tl.float32)
            prob = tl.where(keep, tl.exp(a * w[None, :] - lse[:, None]), 0.0)
            ds = prob * (dp * w[None, :] - delta[:, None])  # d logit
            if NEED_WEIGHT_GRAD:
                part = tl.sum(ds * a + prob * dp, 0)
                dw_row = ((g.to(tl.int64) * HEADS + h) * num_m + tile) * n_keys
                tl.store(dw_ptr + dw_row + u, part, mask=u_ok)
            ds *= w[None, :]  # the logit's derivative in q runs through the weighted keys
        else:
            prob = tl.where(keep, tl.exp(a - lse[:, None]), 0.0)
            ds = prob * (dp - delta[:, None])
        dq += tl.dot(_operand(ds, dtype, INTERP_BF16), tl.trans(kt), input_precision=DOT_PREC)

    dq *= scale
    dq_row = (g.to(tl.int64) * TQ + offs_m) * (HEADS * DQK)
    tl.store(dq_ptr + dq_row[:, None] + (h * DQK + offs_dq)[None, :],
             _cast_out(dq, dtype, INTERP_BF16), mask=m_ok[:, None] & dq_ok[None, :])


@triton.jit
def _backward_dkv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, w_ptr, valid_ptr, lse_ptr, delta_ptr, order_ptr, starts_ptr,
    dk_ptr, dv_ptr,
    P, TQ, TK, TOPK, HEADS, DQK, DV, scale,
    sq_n, sq_p, sq_t, sq_c,
    sk_n, sk_p, sk_t, sk_c,
    sv_n, sv_p, sv_t, sv_c,
    sd_n, sd_p, sd_t, sd_c,
    HAS_WEIGHT: tl.constexpr, HAS_VALID: tl.constexpr,
    DOT_PREC: tl.constexpr, INTERP_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dK and dV of one key tile of one head of key region g = n * P + r, summed over the list
    entries order[starts[g] : starts[g + 1]]: flat slots (n * P + p) * TOPK + j of the query
    regions p that routed to r (a region routed twice by p appears twice)."""
    dtype = k_ptr.dtype.element_ty
    pid = tl.program_id(0)
    num_n = tl.cdiv(TK, BLOCK_N)
    tile = pid % num_n
    h = (pid // num_n) % HEADS
    g = pid // (num_n * HEADS)
    n = (g // P).to(tl.int64)
    r = (g % P).to(tl.int64)

    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < TK
    offs_dq = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    dq_ok = offs_dq < DQK
    dv_ok = offs_dv < DV
    kt = tl.load(k_ptr + n * sk_n + r * sk_p + offs_n[None, :] * sk_t
                 + (h * DQK + offs_dq)[:, None] * sk_c,
                 mask=dq_ok[:, None] & n_ok[None, :], other=0.0)
    kt = _widen(kt, INTERP_BF16)
    vt = tl.load(v_ptr + n * sv_n + r * sv_p + offs_n[None, :] * sv_t
                 + (h * DV + offs_dv)[:, None] * sv_c,
                 mask=dv_ok[:, None] & n_ok[None, :], other=0.0)
    vt = _widen(vt, INTERP_BF16)
    keep_col = n_ok
    if HAS_VALID:
        keep_col = keep_col & (tl.load(valid_ptr + r * TK + offs_n, mask=n_ok, other=0) != 0)
    q_base = q_ptr + n * sq_n + (h * DQK + offs_dq)[None, :] * sq_c
    do_base = do_ptr + n * sd_n + (h * DV + offs_dv)[None, :] * sd_c

    dk = tl.zeros([BLOCK_N, BLOCK_DQK], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    start = tl.load(starts_ptr + g)
    n_rows = (tl.load(starts_ptr + g + 1) - start) * TQ  # query rows: routing entries x tokens
    for u0 in range(0, n_rows, BLOCK_M):
        u = u0 + tl.arange(0, BLOCK_M)
        u_ok = u < n_rows
        slot = tl.load(order_ptr + start + u // TQ, mask=u_ok, other=0)  # (n * P + p) * TOPK + j
        qg = slot // TOPK  # query region n * P + p
        t = u % TQ
        row_q = (qg - n * P) * sq_p + t * sq_t
        q = tl.load(q_base + row_q[:, None], mask=u_ok[:, None] & dq_ok[None, :], other=0.0)
        q = _widen(q, INTERP_BF16)
        row_do = (qg - n * P) * sd_p + t * sd_t
        do = tl.load(do_base + row_do[:, None], mask=u_ok[:, None] & dv_ok[None, :], other=0.0)
        do = _widen(do, INTERP_BF16)
        lse_row = (qg * HEADS + h) * TQ + t
        lse = tl.load(lse_ptr + lse_row, mask=u_ok, other=0.0)
        delta = tl.load(delta_ptr + lse_row, mask=u_ok, other=0.0)

        logits = tl.dot(q, kt, input_precision=DOT_PREC) * scale
        dp = tl.dot(do, vt, input_precision=DOT_PREC)
        if HAS_WEIGHT:  # each row has the weight of its routing slot
            w = tl.load(w_ptr + slot, mask=u_ok, other=0.0).to(tl.float32)
            logits *= w[:, None]
            dp *= w[:, None]
        keep = u_ok[:, None] & keep_col[None, :]
        prob = tl.where(keep, tl.exp(logits - lse[:, None]), 0.0)
        ds = prob * (dp - delta[:, None])
        if HAS_WEIGHT:  # the keys and values entered as w * k and w * v
            prob *= w[:, None]
            ds *= w[:, None]
        dv += tl.dot(tl.trans(_operand(prob, dtype, INTERP_BF16)), do, input_precision=DOT_PREC)
        dk += tl.dot(tl.trans(_operand(ds, dtype, INTERP_BF16)), q, input_precision=DOT_PREC)

    dk *= scale
    row = (g.to(tl.int64) * TK + offs_n)
    tl.store(dk_ptr + (row * (HEADS * DQK))[:, None] + (h * DQK + offs_dq)[None, :],
             _cast_out(dk, dtype, INTERP_BF16), mask=n_ok[:, None] & dq_ok[None, :])
    tl.store(dv_ptr + (row * (HEADS * DV))[:, None] + (h * DV + offs_dv)[None, :],
             _cast_out(dv, dtype, INTERP_BF16), mask=n_ok[:, None] & dv_ok[None, :])


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------


def _common(q, k, v, r_idx, r_weight, key_valid, num_heads):
    """Shape arguments, the optional inputs as kernel pointers, the launch flags and the largest
    tile."""
    N, P, Tq, Cqk = q.shape
    Tk, Cv = v.shape[2], v.shape[3]
    topk = r_idx.shape[-1]
    shape = (P, Tq, Tk, topk, num_heads, Cqk // num_heads, Cv // num_heads)
    r_idx = r_idx.contiguous()
    w = r_idx if r_weight is None else r_weight.contiguous()  # unused pointer when absent
    valid = r_idx if key_valid is None else key_valid.contiguous().view(torch.uint8)
    flags = {"HAS_WEIGHT": r_weight is not None, "HAS_VALID": key_valid is not None}
    prec, interp_bf16 = _dot_flags(q.dtype, q.device)
    block_dqk, block_dv = _head_block(shape[5]), _head_block(shape[6])
    largest, flags["num_warps"] = _launch_shape(q.dtype, max(block_dqk, block_dv))
    flags.update(DOT_PREC=prec, INTERP_BF16=interp_bf16, BLOCK_DQK=block_dqk, BLOCK_DV=block_dv)
    return shape, r_idx, w, valid, flags, largest


def _check_indices(r_idx: torch.Tensor, num_regions: int) -> None:
    # The kernels read through r_idx without bounds checks: an out-of-range region is an error
    # here (asynchronous on CUDA, like index_select's device assert in the reference).
    torch._assert_async(((r_idx >= 0) & (r_idx < num_regions)).all(),
                        f"routed_attention: r_idx must lie in [0, {num_regions})")


def forward(q, k, v, r_idx, r_weight, key_valid, num_heads, scale):
    """``(out, lse)`` as ``routed_attention_ref`` returns them: out (N, P, Tq, C_v) contiguous in
    q's dtype, lse (N, P, heads, Tq) float32. q, k, v may have any strides."""
    N = q.shape[0]
    (P, Tq, Tk, topk, heads, dqk, dv), r_idx, w, valid, flags, largest = _common(
        q, k, v, r_idx, r_weight, key_valid, num_heads)
    _check_indices(r_idx, P)
    out = torch.empty((N, P, Tq, heads * dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((N, P, heads, Tq), dtype=torch.float32, device=q.device)
    if Tq == 0:
        return out, lse
    block_m = _tile(Tq, largest)
    grid = (N * P * heads * triton.cdiv(Tq, block_m),)
    with _device_ctx(q):
        _forward_kernel[grid](
            q, k, v, r_idx, w, valid, out, lse,
            P, Tq, Tk, topk, heads, dqk, dv, float(scale),
            *q.stride(), *k.stride(), *v.stride(),
            BLOCK_M=block_m, BLOCK_N=_tile(topk * Tk, largest), **flags,
        )
    return out, lse


def _inverse_routing(r_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, starts): ``order[starts[g] : starts[g + 1]]`` lists the flat routing slots
    (n * P + p) * topk + j with r_idx[n, p, j] == r, for key region g = n * P + r, in slot order
    (a stable sort, so the dK/dV sums run in a fixed order)."""
    N, P, _ = r_idx.shape
    key = (r_idx + torch.arange(N, device=r_idx.device).view(N, 1, 1) * P).reshape(-1)
    sorted_key, order = torch.sort(key, stable=True)
    starts = torch.searchsorted(sorted_key, torch.arange(N * P + 1, device=r_idx.device))
    return order, starts


def backward(grad_out, q, k, v, out, lse, r_idx, r_weight, key_valid, num_heads, scale,
             need_weight_grad):
    """``(grad_q, grad_k, grad_v, grad_r_weight)`` as ``routed_attention_backward_ref`` returns
    them: contiguous gradients in the inputs' dtypes, grad_r_weight in r_weight's dtype (an empty
    tensor unless ``need_weight_grad``)."""
    N = q.shape[0]
    (P, Tq, Tk, topk, heads, dqk, dv), r_idx, w, valid, flags, largest = _common(
        q, k, v, r_idx, r_weight, key_valid, num_heads)
    lse = lse.contiguous()
    grad_q = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    grad_k = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    grad_v = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    need_weight_grad = need_weight_grad and r_weight is not None
    if Tq == 0:  # no queries: nothing flows back
        grad_w = torch.zeros_like(r_weight) if need_weight_grad else q.new_empty(0)
        return grad_q, grad_k.zero_(), grad_v.zero_(), grad_w
    block_m, block_n = _tile(Tq, largest), _tile(topk * Tk, largest)
    num_m = triton.cdiv(Tq, block_m)
    delta = torch.empty_like(lse, dtype=torch.float32)
    # The weight gradient's shares per (query region, head, query tile, gathered key row);
    # without it the kernel still takes a valid pointer (delta), which it never touches.
    dw_parts = delta
    if need_weight_grad:
        dw_parts = torch.empty((N * P, heads, num_m, topk * Tk), dtype=torch.float32,
                               device=q.device)
    order, starts = _inverse_routing(r_idx)
    strides = (*q.stride(), *k.stride(), *v.stride())
    with _device_ctx(q):
        _backward_dq_kernel[(N * P * heads * num_m,)](
            q, k, v, out, grad_out, r_idx, w, valid, lse, delta, grad_q, dw_parts,
            P, Tq, Tk, topk, heads, dqk, dv, float(scale),
            *strides, *out.stride(), *grad_out.stride(),
            NEED_WEIGHT_GRAD=need_weight_grad, BLOCK_M=block_m, BLOCK_N=block_n, **flags,
        )
        block_n = _tile(Tk, largest)  # key tiles of one region; query rows gathered across entries
        _backward_dkv_kernel[(N * P * heads * triton.cdiv(Tk, block_n),)](
            q, k, v, grad_out, w, valid, lse, delta, order, starts, grad_k, grad_v,
            P, Tq, Tk, topk, heads, dqk, dv, float(scale),
            *strides, *grad_out.stride(),
            BLOCK_M=_tile(Tq * topk, largest), BLOCK_N=block_n, **flags,
        )
    grad_w = q.new_empty(0)
    if need_weight_grad:
        grad_w = dw_parts.view(N, P, heads * num_m, topk, Tk).sum((2, 4)).to(r_weight.dtype)
    return grad_q, grad_k, grad_v, grad_w


def unsupported_reasons(q, k, v, num_heads) -> list[str]:
    """Why these kernels cannot serve the op's inputs (empty if they can). Device placement and
    triton availability are the dispatcher's business, not checked here."""
    reasons = []
    if q.dtype not in _SUPPORTED_DTYPES:
        reasons.append(f"dtype {q.dtype} is not supported (float32, float16, bfloat16)")
    for name, channels in (("q/k", q.shape[-1]), ("v", v.shape[-1])):
        if channels // num_heads > _MAX_HEAD_DIM:
            reasons.append(f"the head size of {name}, {channels // num_heads}, exceeds "
                           f"{_MAX_HEAD_DIM}")
    # one program per (region, head, token tile of _MIN_TILE at the smallest), in one grid axis
    N, P, Tq, _ = q.shape
    programs = N * P * num_heads * triton.cdiv(max(Tq, k.shape[2]), _MIN_TILE)
    if programs > _INT32_MAX:
        reasons.append(f"N={N}, P={P}, heads={num_heads}, Tq={Tq}, Tk={k.shape[2]} need "
                       f"{programs} programs, more than a launch grid takes (2**31 - 1)")
    return reasons
