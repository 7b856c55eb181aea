"""Triton kernels for the Monarch product (forward and backward).

Semantics (fly's ``blockdiag_butterfly_multiply`` with MonarchLinear's padding/truncation)::

    x (T, in_features) zero-padded to k*p;  w1 (k, q, p);  w2 (l, s, r) with k*q == l*r
    mid[t, kk*q + j]  = sum_pp w1[kk, j, pp] * x_pad[t, kk*p + pp]
    in2[t, ll, rr]    = mid[t, rr*l + ll]
    out[t, ss*l + ll] = sum_rr w2[ll, ss, rr] * in2[t, ll, rr]
    y = out[:, :out_features] (+ bias)

Design. Every step is a *strided block-diagonal matmul*

    out[t, b, n] = sum_c in[t, b, c] * w[b, n, c]

where an activation operand is a view of a flat feature vector, ``flat = b * BS + e * ES``:
block-contiguous (``BS`` = block size, ``ES`` = 1) or interleaved (``BS`` = 1, ``ES`` = number of
blocks). The perfect shuffle of the middle and the output shuffle are interleaved views, the
transposed weights of the backward are swapped weight strides, and zero padding / truncation are
masks ``flat < LIMIT``. So there are no transpose passes and no padded copies: two kernels do it all,

* ``_bd_mm_kernel``     the strided block-diagonal matmul above (+ optional bias epilogue);
* ``_bd_wgrad_kernel``  dW[b, n, c] = sum_t A[t, b, n] * B[t, b, c] (both operands strided views),
                        optionally split over tokens into an fp32 workspace when the weights alone
                        give too few programs to fill the GPU (deterministic: no atomics).

forward  = 2 launches (mid, then out with the bias fused);
backward = 4 launches (d_mid, dW2, dx, dW1): mid is not recomputed but read from ``mid_t``.

``mid_t`` (saved by the forward when ``save_mid``, as fly saves its middle activation) is mid
*feature-major*: a contiguous (k*q, T) tensor with ``mid_t[kk*q + j, t] = mid[t, kk*q + j]``. The
first kernel stores it directly in that layout (token stride 1, feature stride T: stores coalesced
along tokens) and the second kernel reads its perfect shuffle as the interleaved view
``in2[t, ll, rr] = mid_t[rr*l + ll, t]`` (block stride T, element stride l*T), again contiguous
along tokens; dW2 reads it the same way. Without ``save_mid`` the forward's temporary mid is
token-major (T, k*q).

Accumulation is in fp32 (``tl.dot`` with an fp32 accumulator); fp32 inputs use IEEE fp32 dots
unless ``torch.backends.cuda.matmul.allow_tf32`` is set. ``mid`` and ``d_mid`` are stored in the
input dtype (as a bmm implementation would). Element offsets of activations are int64 (token
index * token stride + flat feature index * feature stride), so neither T nor k*q*T is limited by
int32; token and flat feature indices, and weight offsets, must fit in int32 (see
``unsupported_reasons``).

This module imports triton at the top and is only imported lazily by ``effnn.ops.monarch``; it
never touches CUDA at import.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

__all__ = ["forward", "backward", "unsupported_reasons"]

try:  # decided once, like triton.jit itself does at decoration time
    _INTERPRET = bool(triton.knobs.runtime.interpret)
except AttributeError:  # older triton without knobs
    _INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT32_MAX = 2**31 - 1
_MIN_TILE = 16  # tl.dot needs tile dims >= 16; smaller blocks are handled by masks
# T must leave room for one tile past it in int32 arithmetic on token indices.
_MAX_T = _INT32_MAX - 1024

# Weight-gradient token split: chunks are multiples of this many tokens.
_WGRAD_MIN_CHUNK = 256


# --------------------------------------------------------------------------------------------
# autotuning
# --------------------------------------------------------------------------------------------

def _configs(shapes):
    if _INTERPRET:  # one small config: no benchmarking, fast interpreted tests
        return [triton.Config({"BLOCK_T": 16, "BLOCK_N": 16, "BLOCK_C": 16}, num_warps=1,
                              num_stages=1)]
    return [
        triton.Config({"BLOCK_T": bt, "BLOCK_N": bn, "BLOCK_C": bc}, num_warps=w, num_stages=s)
        for bt, bn, bc, w, s in shapes
    ]


# (BLOCK_T, BLOCK_N, BLOCK_C, num_warps, num_stages); BLOCK_C is the reduction dim.
_MM_SHAPES = [
    (128, 128, 64, 8, 3),
    (128, 128, 32, 8, 4),
    (128, 64, 64, 4, 3),
    (128, 64, 32, 4, 4),
    (64, 128, 32, 4, 4),
    (64, 64, 64, 4, 3),
    (64, 64, 32, 4, 4),
    (128, 32, 32, 4, 4),
    (64, 32, 32, 2, 4),
]
# (BLOCK_T, BLOCK_N, BLOCK_C, num_warps, num_stages); BLOCK_T is the reduction dim.
_WGRAD_SHAPES = [
    (32, 128, 128, 8, 3),
    (64, 128, 64, 4, 3),
    (64, 64, 128, 4, 3),
    (32, 64, 64, 4, 4),
    (64, 64, 64, 4, 3),
    (64, 32, 32, 4, 4),
    (128, 32, 32, 4, 3),
]


def _clamp_configs(configs, named_args, **kwargs):
    """Shrink BLOCK_N / BLOCK_C to the (power-of-two, >= 16) block dims, then deduplicate."""
    args = {**named_args, **kwargs}
    cap_n = max(_MIN_TILE, triton.next_power_of_2(max(int(args["N"]), 1)))
    cap_c = max(_MIN_TILE, triton.next_power_of_2(max(int(args["C"]), 1)))
    seen, out = set(), []
    for cfg in configs:
        kw = dict(cfg.kwargs)
        kw["BLOCK_N"] = min(kw["BLOCK_N"], cap_n)
        kw["BLOCK_C"] = min(kw["BLOCK_C"], cap_c)
        sig = (tuple(sorted(kw.items())), cfg.num_warps, cfg.num_stages)
        if sig not in seen:
            seen.add(sig)
            out.append(triton.Config(kw, num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    return out


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
# INTERP_BF16 works around two TRITON_INTERPRET=1 bugs for bfloat16 (triton 3.8): tl.dot multiplies
# the raw uint16 storage, and fp32 -> bf16 casts truncate instead of rounding to nearest even. It
# is only ever set under the interpreter; compiled kernels use plain bf16 dots and casts.

@triton.jit
def _cast_out(acc, dtype: tl.constexpr, INTERP_BF16: tl.constexpr):
    if INTERP_BF16:  # round fp32 -> bf16 to nearest even by hand (finite values)
        bits = acc.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return acc.to(dtype)


@triton.autotune(
    configs=_configs(_MM_SHAPES),
    # block shapes and view pattern (token strides tell token-major from feature-major
    # operands), never T (no re-tuning per sequence length)
    key=["NB", "N", "C", "IN_ES", "OUT_ES", "in_st", "out_st"],
    prune_configs_by={"early_config_prune": _clamp_configs},
)
@triton.jit(do_not_specialize=["T"])
def _bd_mm_kernel(
    in_ptr, w_ptr, bias_ptr, out_ptr,
    T, NB, N, C,
    in_st, in_sf, IN_BS, IN_ES, IN_LIMIT,
    w_sb, w_sn, w_sc,
    out_st, out_sf, OUT_BS, OUT_ES, OUT_LIMIT,
    HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr, INTERP_BF16: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out[t, b, n] = sum_c in[t, b, c] * w[b, n, c] (+ bias), all operands strided views.

    in  element (t, b, c) lives at in_ptr  + t*in_st  + (b*IN_BS  + c*IN_ES)*in_sf,
        and is zero unless b*IN_BS + c*IN_ES < IN_LIMIT (zero padding);
    out element (t, b, n) lives at out_ptr + t*out_st + (b*OUT_BS + n*OUT_ES)*out_sf,
        and is stored only if b*OUT_BS + n*OUT_ES < OUT_LIMIT (truncation);
    w   element (b, n, c) lives at w_ptr + b*w_sb + n*w_sn + c*w_sc.
    """
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    # n-tiles fastest, then blocks, then token tiles: programs running together read the same
    # token rows (neighbouring blocks of an interleaved view share cache lines).
    pid_n = pid % num_n
    rest = pid // num_n
    blk = rest % NB
    pid_t = rest // NB

    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_C)
    t_ok = offs_t < T
    n_ok = offs_n < N
    rows_in = offs_t.to(tl.int64) * in_st
    w_base = w_ptr + blk.to(tl.int64) * w_sb

    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + offs_c
        c_ok = cc < C
        flat = blk * IN_BS + cc * IN_ES
        a = tl.load(
            in_ptr + rows_in[:, None] + (flat.to(tl.int64) * in_sf)[None, :],
            mask=t_ok[:, None] & (c_ok & (flat < IN_LIMIT))[None, :],
            other=0.0,
        )
        w = tl.load(
            w_base + cc[:, None] * w_sc + offs_n[None, :] * w_sn,
            mask=c_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        if INTERP_BF16:  # bf16 * bf16 products are exact in fp32
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=DOT_PREC)

    flat_out = blk * OUT_BS + offs_n * OUT_ES
    o_ok = n_ok & (flat_out < OUT_LIMIT)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + flat_out, mask=o_ok, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    out_ptrs = (out_ptr + offs_t.to(tl.int64)[:, None] * out_st
                + (flat_out.to(tl.int64) * out_sf)[None, :])
    tl.store(out_ptrs, _cast_out(acc, out_ptr.dtype.element_ty, INTERP_BF16),
             mask=t_ok[:, None] & o_ok[None, :])


@triton.autotune(
    configs=_configs(_WGRAD_SHAPES),
    key=["NB", "N", "C", "A_ES", "B_ES", "a_st", "b_st"],
    prune_configs_by={"early_config_prune": _clamp_configs},
)
@triton.jit(do_not_specialize=["T", "T_CHUNK"])
def _bd_wgrad_kernel(
    a_ptr, b_ptr, out_ptr,
    T, T_CHUNK, NB, N, C,
    a_st, a_sf, A_BS, A_ES, A_LIMIT,
    b_st, b_sf, B_BS, B_ES, B_LIMIT,
    o_ss, o_sb, o_sn, o_sc,
    DOT_PREC: tl.constexpr, INTERP_BF16: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out[split, b, n, c] = sum_{t in chunk split} A[t, b, n] * B[t, b, c].

    A (t, b, n) at a_ptr + t*a_st + (b*A_BS + n*A_ES)*a_sf, zero unless the flat index < A_LIMIT;
    B likewise. Token chunk ``split`` is [split*T_CHUNK, min(T, (split+1)*T_CHUNK)).
    """
    pid = tl.program_id(0)
    num_c = tl.cdiv(C, BLOCK_C)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_c = pid % num_c
    rest = pid // num_c
    pid_n = rest % num_n
    rest = rest // num_n
    blk = rest % NB
    split = rest // NB

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_tt = tl.arange(0, BLOCK_T)
    flat_a = blk * A_BS + offs_n * A_ES
    flat_b = blk * B_BS + offs_c * B_ES
    a_col_ok = (offs_n < N) & (flat_a < A_LIMIT)
    b_col_ok = (offs_c < C) & (flat_b < B_LIMIT)
    cols_a = flat_a.to(tl.int64) * a_sf
    cols_b = flat_b.to(tl.int64) * b_sf

    t_start = split * T_CHUNK
    t_end = t_start + tl.minimum(T - t_start, T_CHUNK)  # no int32 overflow near T = 2**31
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    for t0 in range(t_start, t_end, BLOCK_T):
        tt = t0 + offs_tt
        t_ok = tt < t_end
        tt64 = tt.to(tl.int64)
        a = tl.load(a_ptr + tt64[:, None] * a_st + cols_a[None, :],
                    mask=t_ok[:, None] & a_col_ok[None, :], other=0.0)
        b = tl.load(b_ptr + tt64[:, None] * b_st + cols_b[None, :],
                    mask=t_ok[:, None] & b_col_ok[None, :], other=0.0)
        if INTERP_BF16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=DOT_PREC)

    out_ptrs = (out_ptr + split.to(tl.int64) * o_ss + blk.to(tl.int64) * o_sb
                + offs_n[:, None] * o_sn + offs_c[None, :] * o_sc)
    tl.store(out_ptrs, _cast_out(acc, out_ptr.dtype.element_ty, INTERP_BF16),
             mask=(offs_n < N)[:, None] & (offs_c < C)[None, :])


# --------------------------------------------------------------------------------------------
# launch helpers
# --------------------------------------------------------------------------------------------

def _launch(kernel, grid, out, *args, **kwargs):
    """Launch ``kernel[grid](*args, **kwargs)``; ``out`` is the tensor the kernel writes.

    Eager calls (plain tensors) launch directly. When these functions are traced inside a
    ``torch.library.triton_op`` (FakeTensor / FunctionalTensor arguments under torch.compile or
    export), the launch goes through ``torch.library.wrap_triton`` so it is captured in the graph.
    (wrap_triton is not used eagerly: its higher-order-op path costs dispatch time per launch.)
    """
    if type(out) is torch.Tensor:
        kernel[grid](*args, **kwargs)
    else:
        torch.library.wrap_triton(kernel)[grid](*args, **kwargs)


def _device_ctx(t: torch.Tensor):
    # Triton launches on the current CUDA device: make it the tensors' device.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _dot_flags(dtype: torch.dtype, device: torch.device) -> tuple[str, bool]:
    """(input_precision for tl.dot, INTERP_BF16 flag).

    input_precision only matters for fp32 operands: IEEE fp32 unless torch's own fp32 matmul
    setting allows TF32 (off by default). fp16/bf16 operands get NVIDIA's default ("tf32",
    ignored for them) and "ieee" elsewhere (AMD's default; the interpreter ignores it).
    """
    nvidia = device.type == "cuda" and torch.version.hip is None and not _INTERPRET
    if dtype == torch.float32:
        prec = "tf32" if nvidia and torch.backends.cuda.matmul.allow_tf32 else "ieee"
    else:
        prec = "tf32" if nvidia else "ieee"
    return prec, (_INTERPRET and dtype == torch.bfloat16)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _mm(inp, in_strides, in_bs, in_es, in_limit, w, w_strides, out, out_strides, out_bs, out_es,
        out_limit, nb, n, c, T, bias=None):
    """Launch the strided block-diagonal matmul (see ``_bd_mm_kernel``) over T tokens.

    T is explicit: an operand may be feature-major (mid_t is (k*q, T)), so no shape tells it.
    """
    if T == 0 or nb == 0 or n == 0:
        return
    prec, interp_bf16 = _dot_flags(inp.dtype, inp.device)

    def grid(meta):
        return (triton.cdiv(T, meta["BLOCK_T"]) * nb * triton.cdiv(n, meta["BLOCK_N"]),)

    _launch(
        _bd_mm_kernel, grid, out,
        inp, w, bias if bias is not None else out, out,
        T, nb, n, c,
        in_strides[0], in_strides[1], in_bs, in_es, in_limit,
        w_strides[0], w_strides[1], w_strides[2],
        out_strides[0], out_strides[1], out_bs, out_es, out_limit,
        HAS_BIAS=bias is not None, DOT_PREC=prec, INTERP_BF16=interp_bf16,
    )


def _wgrad_chunk(T: int, base_programs: int, device: torch.device) -> int:
    """Tokens per split of the weight-gradient reduction (T itself means no split)."""
    target = 2 * _num_sms(device)
    if base_programs >= target or T <= _WGRAD_MIN_CHUNK:
        return T
    split = min(triton.cdiv(target, base_programs), triton.cdiv(T, _WGRAD_MIN_CHUNK))
    chunk = triton.cdiv(triton.cdiv(T, split), _WGRAD_MIN_CHUNK) * _WGRAD_MIN_CHUNK
    return min(chunk, T)


def _wgrad(a, a_strides, a_bs, a_es, a_limit, b, b_strides, b_bs, b_es, b_limit, nb, n, c,
           T, out_dtype):
    """dW[b, n, c] = sum_t A[t, b, n] * B[t, b, c] over T tokens, returned contiguous (nb, n, c)
    in out_dtype."""
    dev = a.device
    if T == 0 or nb * n * c == 0:
        return torch.zeros((nb, n, c), dtype=out_dtype, device=dev)
    prec, interp_bf16 = _dot_flags(a.dtype, dev)
    base = nb * triton.cdiv(n, 64) * triton.cdiv(c, 64)  # programs at a typical tile size
    chunk = _wgrad_chunk(T, base, dev)
    n_split = triton.cdiv(T, chunk)
    if n_split == 1:
        out = torch.empty((1, nb, n, c), dtype=out_dtype, device=dev)
    else:
        out = torch.empty((n_split, nb, n, c), dtype=torch.float32, device=dev)

    def grid(meta):
        return (n_split * nb * triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(c, meta["BLOCK_C"]),)

    _launch(
        _bd_wgrad_kernel, grid, out,
        a, b, out,
        T, chunk, nb, n, c,
        a_strides[0], a_strides[1], a_bs, a_es, a_limit,
        b_strides[0], b_strides[1], b_bs, b_es, b_limit,
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        DOT_PREC=prec, INTERP_BF16=interp_bf16,
    )
    if n_split == 1:
        return out[0]
    return out.sum(0).to(out_dtype)


def _check(x, w1, w2, out_features):
    if x.dim() != 2 or w1.dim() != 3 or w2.dim() != 3:
        raise ValueError(
            f"monarch triton kernel: expected x 2-D, w1 and w2 3-D, got x {tuple(x.shape)}, "
            f"w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}")
    k, q, p = w1.shape
    l, s, r = w2.shape  # noqa: E741 (the specification's names)
    if k * q != l * r:
        raise ValueError(f"monarch triton kernel: w1 (k, q, p)={tuple(w1.shape)} and w2 (l, s, r)="
                         f"{tuple(w2.shape)} need k*q == l*r, got {k * q} != {l * r}")
    if x.shape[1] > k * p:
        raise ValueError(f"monarch triton kernel: x.shape[1]={x.shape[1]} exceeds k*p={k * p} "
                         f"of w1 {tuple(w1.shape)}")
    if not 0 <= out_features <= l * s:
        raise ValueError(f"monarch triton kernel: out_features={out_features} must be in "
                         f"[0, l*s={l * s}] for w2 {tuple(w2.shape)}")


def _first_factor(x, w1, mid, mid_strides):
    """mid[t, kk*q + j] = sum_pp w1[kk, j, pp] * x_pad[t, kk*p + pp], stored at
    ``t * mid_strides[0] + (kk*q + j) * mid_strides[1]`` (token-major or feature-major)."""
    k, q, p = w1.shape
    _mm(x, x.stride(), p, 1, x.shape[1],
        w1, w1.stride(),
        mid, mid_strides, q, 1, k * q,
        nb=k, n=q, c=p, T=x.shape[0])


# --------------------------------------------------------------------------------------------
# public entry points
# --------------------------------------------------------------------------------------------

def forward(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, bias: torch.Tensor | None,
            out_features: int, save_mid: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, mid_t): y = monarch(x, w1, w2)[:, :out_features] (+ bias); x (T, in) of any strides.

    y is a contiguous (T, out_features) tensor in x.dtype. If ``save_mid``, mid_t is a new
    contiguous (k*q, T) tensor in x.dtype holding the middle activation feature-major,
    ``mid_t[kk*q + j, t] = mid[t, kk*q + j]`` (computed in full even when out_features == 0, so
    the backward can always read it); otherwise mid_t is an empty (0,) tensor.
    """
    _check(x, w1, w2, out_features)
    T = x.shape[0]
    k, q, p = w1.shape
    l, s, r = w2.shape  # noqa: E741 (the specification's names)
    kq = k * q
    if bias is not None:
        if bias.shape != (out_features,):
            raise ValueError(f"monarch triton kernel: bias must have shape ({out_features},), "
                             f"got {tuple(bias.shape)}")
        bias = bias.contiguous()
    y = torch.empty((T, out_features), dtype=x.dtype, device=x.device)
    if save_mid:
        mid_t = torch.empty((kq, T), dtype=x.dtype, device=x.device)
    else:
        mid_t = torch.empty((0,), dtype=x.dtype, device=x.device)
    if T == 0 or (out_features == 0 and not save_mid):
        return y, mid_t
    with _device_ctx(x):
        if save_mid:
            mid, mid_strides = mid_t, (mid_t.stride(1), mid_t.stride(0))  # (token, feature)
        else:  # temporary, token-major
            mid = torch.empty((T, kq), dtype=x.dtype, device=x.device)
            mid_strides = mid.stride()
        _first_factor(x, w1, mid, mid_strides)
        if out_features > 0:
            # out[t, ss*l + ll] = sum_rr w2[ll, ss, rr] * mid[t, rr*l + ll]; rows ss with
            # ss*l >= out_features are truncated away, so only s_eff of them are computed.
            s_eff = min(s, triton.cdiv(out_features, l))
            _mm(mid, mid_strides, 1, l, kq,
                w2, w2.stride(),
                y, y.stride(), 1, l, out_features,
                nb=l, n=s_eff, c=r, T=T, bias=bias)
    return y, mid_t


def backward(grad_out: torch.Tensor, x: torch.Tensor, mid_t: torch.Tensor, w1: torch.Tensor,
             w2: torch.Tensor, need_input_grad: bool
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw1, dw2) of y = monarch(x, w1, w2)[:, :out_features] for grad_out (T, out_features).

    mid_t is the forward's saved middle activation, shape (k*q, T) feature-major (any strides;
    cast to x.dtype if it differs); mid is not recomputed. dx is (T, in_features) in x.dtype, or
    an empty (0,) tensor when need_input_grad is False; dw1 / dw2 are contiguous, shaped like
    w1 / w2, in the weights' dtype.
    """
    out_features = grad_out.shape[-1]
    _check(x, w1, w2, out_features)
    if grad_out.dim() != 2 or grad_out.shape[0] != x.shape[0]:
        raise ValueError(f"monarch triton kernel: grad_out must be (T={x.shape[0]}, out_features),"
                         f" got {tuple(grad_out.shape)}")
    T, n_in = x.shape
    k, q, p = w1.shape
    l, s, r = w2.shape  # noqa: E741 (the specification's names)
    kq = k * q
    if mid_t.shape != (kq, T):
        raise ValueError(f"monarch triton kernel: mid_t must be the forward's saved middle "
                         f"activation of shape (k*q={kq}, T={T}) (forward with save_mid=True), "
                         f"got {tuple(mid_t.shape)}")
    if grad_out.dtype != x.dtype:
        grad_out = grad_out.to(x.dtype)
    if mid_t.device != x.device:
        raise ValueError(f"monarch triton kernel: mid_t is on {mid_t.device}, x on {x.device}")
    if mid_t.dtype != x.dtype:
        mid_t = mid_t.to(x.dtype)
    dev = x.device
    if T == 0:
        dx = (torch.empty((0, n_in), dtype=x.dtype, device=dev) if need_input_grad
              else torch.empty((0,), dtype=x.dtype, device=dev))
        return dx, torch.zeros(w1.shape, dtype=w1.dtype, device=dev), \
            torch.zeros(w2.shape, dtype=w2.dtype, device=dev)

    with _device_ctx(x):
        go = grad_out
        mid_strides = (mid_t.stride(1), mid_t.stride(0))  # (token, feature)

        # d_mid[t, rr*l + ll] = sum_ss go[t, ss*l + ll] * w2[ll, ss, rr]  (w2 transposed by strides)
        s_eff = min(s, triton.cdiv(out_features, l))
        dmid = torch.empty((T, kq), dtype=x.dtype, device=dev)
        _mm(go, go.stride(), 1, l, out_features,
            w2, (w2.stride(0), w2.stride(2), w2.stride(1)),
            dmid, dmid.stride(), 1, l, kq,
            nb=l, n=r, c=s_eff, T=T)

        # dw2[ll, ss, rr] = sum_t go[t, ss*l + ll] * mid_t[rr*l + ll, t]
        dw2 = _wgrad(go, go.stride(), 1, l, out_features,
                     mid_t, mid_strides, 1, l, kq,
                     nb=l, n=s, c=r, T=T, out_dtype=w2.dtype)

        # dx[t, kk*p + pp] = sum_j d_mid[t, kk*q + j] * w1[kk, j, pp], truncated to in_features
        if need_input_grad:
            dx = torch.empty((T, n_in), dtype=x.dtype, device=dev)
            if n_in > 0:
                k_eff = min(k, triton.cdiv(n_in, p))  # blocks that hold real input columns
                _mm(dmid, dmid.stride(), q, 1, kq,
                    w1, (w1.stride(0), w1.stride(2), w1.stride(1)),
                    dx, dx.stride(), p, 1, n_in,
                    nb=k_eff, n=p, c=q, T=T)
        else:
            dx = torch.empty((0,), dtype=x.dtype, device=dev)

        # dw1[kk, j, pp] = sum_t d_mid[t, kk*q + j] * x_pad[t, kk*p + pp]
        dw1 = _wgrad(dmid, dmid.stride(), q, 1, kq,
                     x, x.stride(), p, 1, n_in,
                     nb=k, n=q, c=p, T=T, out_dtype=w1.dtype)
    return dx, dw1, dw2


def unsupported_reasons(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> list[str]:
    """Why these kernels cannot serve (x, w1, w2); empty if they can.

    Device placement and triton availability are the dispatcher's business, not checked here.
    """
    reasons: list[str] = []
    for name, t, nd in (("x", x, 2), ("w1", w1, 3), ("w2", w2, 3)):
        if t.dim() != nd:
            reasons.append(f"{name} must be {nd}-D, got shape {tuple(t.shape)}")
        if t.dtype not in _SUPPORTED_DTYPES:
            reasons.append(f"{name}.dtype={t.dtype} is not supported "
                           "(float32, float16, bfloat16)")
    if len({x.dtype, w1.dtype, w2.dtype}) > 1:
        reasons.append(f"mixed dtypes: x {x.dtype}, w1 {w1.dtype}, w2 {w2.dtype} "
                       "(the kernels need one dtype)")
    if len({x.device, w1.device, w2.device}) > 1:
        reasons.append(f"tensors on different devices: x {x.device}, w1 {w1.device}, "
                       f"w2 {w2.device}")
    if x.dim() != 2 or w1.dim() != 3 or w2.dim() != 3:
        return reasons
    T, n_in = x.shape
    k, q, p = w1.shape
    l, s, r = w2.shape  # noqa: E741 (the specification's names)
    if T > _MAX_T:
        reasons.append(f"T={T} tokens exceeds the int32 token index limit {_MAX_T}")
    for name, v in (("in_features", n_in), ("k*p", k * p), ("k*q", k * q), ("l*r", l * r),
                    ("l*s", l * s)):
        if v > _INT32_MAX:
            reasons.append(f"{name}={v} exceeds int32 indexing")
    for name, t in (("w1", w1), ("w2", w2)):
        span = sum((d - 1) * abs(st) for d, st in zip(t.shape, t.stride(), strict=True) if d > 0)
        if span > _INT32_MAX:
            reasons.append(f"{name} spans {span} elements, exceeding int32 indexing")
    # 1-D launch grid, counted at the smallest tile size (an upper bound on the programs).
    tiles_t = triton.cdiv(T, _MIN_TILE)
    widest = max(k * triton.cdiv(q, _MIN_TILE), k * triton.cdiv(p, _MIN_TILE),
                 l * triton.cdiv(s, _MIN_TILE), l * triton.cdiv(r, _MIN_TILE))
    if tiles_t * widest > _INT32_MAX:
        reasons.append(f"T={T} with blocks w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)} needs more "
                       "than 2**31-1 programs in one launch")
    return reasons
