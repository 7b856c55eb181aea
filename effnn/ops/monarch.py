"""Monarch matrices (Dao et al., ICML 2022): the product of two block-diagonal factors with
permutations, in the layout of the official implementation (HazyResearch/fly, ``MonarchLinear``
and ``blockdiag_butterfly_multiply``).

For ``x`` of shape (T, in_features), ``blkdiag1`` (k, q, p) and ``blkdiag2`` (l, s, r) with
k*q == l*r, ``x`` is zero-padded to k*p features and::

    mid[t, kk*q + j]  = sum_pp blkdiag1[kk, j, pp] * x[t, kk*p + pp]     first factor
    in2[t, ll, rr]    = mid[t, rr*l + ll]                                the "perfect shuffle"
    out[t, ss*l + ll] = sum_rr blkdiag2[ll, ss, rr] * in2[t, ll, rr]     second factor, output shuffle
    y = out[:, :out_features] + bias

This file holds the reference implementation (``monarch_linear_ref`` and its backward: plain
PyTorch, the specification), the registered ops ``effnn::monarch_linear`` and
``effnn::monarch_linear_backward`` with their fake functions, autograd and FLOP formulas, the
dispatch to the Triton kernels (``effnn/kernels/monarch.py``) and the compiled CPU kernel
(``csrc/monarch_cpu.cpp``), and the conversions between dense and Monarch weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from effnn import _ext
from effnn.flops import register_macs
from effnn.ops._dispatch import ext_device_reasons, select_backend, triton_device_reasons

__all__ = [
    "monarch_linear",
    "monarch_linear_ref",
    "monarch_linear_backward_ref",
    "monarch_factor_shapes",
    "monarch_project",
    "monarch_to_dense",
]


def monarch_factor_shapes(
    in_features: int, out_features: int, nblocks: int
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Shapes of (blkdiag1, blkdiag2) of fly's ``MonarchLinear``.

    Block sizes are ceil(in/nblocks) and ceil(out/nblocks); the middle width is the smaller of the
    padded input and output widths, so the rectangular factor is the second one when the layer
    expands and the first one otherwise.
    """
    in_blk = -(-in_features // nblocks)
    out_blk = -(-out_features // nblocks)
    if in_blk < out_blk:  # expansion: in_ext < out_ext
        return (nblocks, in_blk, in_blk), (nblocks, out_blk, in_blk)
    return (nblocks, out_blk, in_blk), (nblocks, out_blk, out_blk)


# --------------------------------------------------------------------------------------------
# Reference path (the specification): batched matmuls on a feature-major middle activation, so
# the middle shuffle is a free view and only the input and output orders cost a copy.
# --------------------------------------------------------------------------------------------


def _pad_features(x: Tensor, width: int) -> Tensor:
    return x if x.shape[1] == width else F.pad(x, (0, width - x.shape[1]))


def _mid_t(x: Tensor, blkdiag1: Tensor) -> Tensor:
    """The first factor's output, feature-major: (k*q, T), row kk*q + j."""
    k, q, p = blkdiag1.shape
    xp = _pad_features(x, k * p)
    return torch.bmm(blkdiag1, xp.view(-1, k, p).permute(1, 2, 0)).view(k * q, -1)


def _forward_ref(
    x: Tensor, blkdiag1: Tensor, blkdiag2: Tensor, bias: Tensor | None, out_features: int
) -> tuple[Tensor, Tensor]:
    T = x.shape[0]
    l, s, r = blkdiag2.shape
    mid_t = _mid_t(x, blkdiag1)
    in2_t = mid_t.view(r, l, T).transpose(0, 1)  # (l, r, T): in2[t, ll, rr] = mid[t, rr*l + ll]
    if bias is None:
        out = torch.bmm(in2_t.transpose(1, 2), blkdiag2.transpose(1, 2))  # (l, T, s)
    else:  # bias[ss*l + ll] lands at out[ll, :, ss]
        bias_ls = F.pad(bias, (0, l * s - out_features)).view(s, l).t().unsqueeze(1)
        out = torch.baddbmm(bias_ls, in2_t.transpose(1, 2), blkdiag2.transpose(1, 2))
    y = out.permute(1, 2, 0).reshape(T, s * l)  # out[t, ss*l + ll]
    y = y if out_features == s * l else y[:, :out_features].contiguous()
    return y, mid_t


def monarch_linear_ref(
    x: Tensor, blkdiag1: Tensor, blkdiag2: Tensor, bias: Tensor | None, out_features: int
) -> Tensor:
    """Reference forward for 2-D ``x`` (T, in_features); returns (T, out_features)."""
    return _forward_ref(x, blkdiag1, blkdiag2, bias, out_features)[0]


def monarch_linear_backward_ref(
    grad_out: Tensor, x: Tensor, mid_t: Tensor, blkdiag1: Tensor, blkdiag2: Tensor,
    need_input_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Reference backward: (grad_x or an empty tensor, grad_blkdiag1, grad_blkdiag2).

    ``mid_t`` is the middle activation the forward saved, feature-major: (k*q, T), row kk*q + j.
    """
    T, in_features = x.shape
    k, q, p = blkdiag1.shape
    l, s, r = blkdiag2.shape
    in2_t = mid_t.view(r, l, T).transpose(0, 1)  # (l, r, T)
    dy = _pad_features(grad_out, l * s)
    dout2 = dy.view(T, s, l).permute(2, 0, 1).contiguous()  # (l, T, s)
    grad_w2 = torch.bmm(dout2.transpose(1, 2), in2_t.transpose(1, 2))  # (l, s, r)
    dmid_t = torch.bmm(blkdiag2.transpose(1, 2), dout2.transpose(1, 2))  # (l, r, T)
    del dout2  # temporaries die as soon as possible: the peak memory of a training step
    dmid_t = dmid_t.transpose(0, 1).reshape(k, q, T)  # row rr*l + ll of the middle
    xp = _pad_features(x, k * p)
    grad_w1 = torch.bmm(dmid_t, xp.view(T, k, p).transpose(0, 1))  # (k, q, p)
    if not need_input_grad:
        return x.new_empty(0), grad_w1, grad_w2
    dx = torch.bmm(dmid_t.transpose(1, 2), blkdiag1)  # (k, T, p)
    dx = dx.transpose(0, 1).reshape(T, k * p)
    return (dx if in_features == k * p else dx[:, :in_features].contiguous()), grad_w1, grad_w2


# --------------------------------------------------------------------------------------------
# Kernels behind the registered ops
# --------------------------------------------------------------------------------------------


def _triton_kernels():
    from effnn.kernels import monarch

    return monarch


def _forward(backend: str, x, blkdiag1, blkdiag2, bias, out_features, save_mid):
    if backend == "triton":
        return _triton_kernels().forward(x, blkdiag1, blkdiag2, bias, out_features, save_mid)
    if backend == "ext":
        return _ext.load().monarch_forward(
            x.contiguous(), blkdiag1.contiguous(), blkdiag2.contiguous(),
            None if bias is None else bias.contiguous(), out_features, save_mid,
        )
    y, mid_t = _forward_ref(x, blkdiag1, blkdiag2, bias, out_features)
    return y, (mid_t if save_mid else x.new_empty(0))


def _backward(backend: str, grad_out, x, mid_t, blkdiag1, blkdiag2, need_input_grad):
    if backend == "triton":
        return _triton_kernels().backward(grad_out, x, mid_t, blkdiag1, blkdiag2, need_input_grad)
    if backend == "ext":
        return _ext.load().monarch_backward(
            grad_out.contiguous(), x.contiguous(), mid_t, blkdiag1.contiguous(),
            blkdiag2.contiguous(), need_input_grad,
        )
    return monarch_linear_backward_ref(grad_out, x, mid_t, blkdiag1, blkdiag2, need_input_grad)


@torch.library.custom_op("effnn::monarch_linear", mutates_args=())
def _monarch_linear_op(
    x: Tensor, blkdiag1: Tensor, blkdiag2: Tensor, bias: Tensor | None, out_features: int,
    backend: str, save_mid: bool,
) -> tuple[Tensor, Tensor]:
    """Returns (y, mid_t): mid_t is the middle activation, feature-major (k*q, T), kept for the
    backward when ``save_mid`` (as fly saves it), else an empty tensor."""
    if x.shape[0] == 0:  # nothing to launch
        backend = "ref"
    return _forward(backend, x, blkdiag1, blkdiag2, bias, out_features, save_mid)


@_monarch_linear_op.register_fake
def _(x, blkdiag1, blkdiag2, bias, out_features, backend, save_mid):
    k, q, _ = blkdiag1.shape
    mid_t = x.new_empty((k * q, x.shape[0])) if save_mid else x.new_empty(0)
    return x.new_empty((x.shape[0], out_features)), mid_t


@torch.library.custom_op("effnn::monarch_linear_backward", mutates_args=())
def _monarch_linear_backward_op(
    grad_out: Tensor, x: Tensor, mid_t: Tensor, blkdiag1: Tensor, blkdiag2: Tensor,
    need_input_grad: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    if x.shape[0] == 0:
        backend = "ref"
    return _backward(backend, grad_out, x, mid_t, blkdiag1, blkdiag2, need_input_grad)


@_monarch_linear_backward_op.register_fake
def _(grad_out, x, mid_t, blkdiag1, blkdiag2, need_input_grad, backend):
    grad_x = x.new_empty(x.shape) if need_input_grad else x.new_empty(0)
    return grad_x, blkdiag1.new_empty(blkdiag1.shape), blkdiag2.new_empty(blkdiag2.shape)


def _setup_context(ctx, inputs, output):
    x, blkdiag1, blkdiag2, bias, out_features, backend, save_mid = inputs
    ctx.save_for_backward(x, output[1], blkdiag1, blkdiag2)
    ctx.mark_non_differentiable(output[1])
    ctx.backend = backend
    ctx.out_features = out_features


def _autograd_backward(ctx, grad_out, _grad_mid):
    x, mid_t, blkdiag1, blkdiag2 = ctx.saved_tensors
    need_x, need_w1, need_w2, need_bias = ctx.needs_input_grad[:4]
    grad_x = grad_w1 = grad_w2 = grad_bias = None
    if need_x or need_w1 or need_w2:
        if mid_t.dim() == 1:  # called directly with save_mid=False: recompute the middle
            _, mid_t = torch.ops.effnn.monarch_linear(
                x, blkdiag1, blkdiag2, None, ctx.out_features, ctx.backend, True
            )
        grad_x, grad_w1, grad_w2 = torch.ops.effnn.monarch_linear_backward(
            grad_out, x, mid_t, blkdiag1, blkdiag2, need_x, ctx.backend
        )
    if need_bias:
        grad_bias = grad_out.sum(0)
    return (
        grad_x if need_x else None,
        grad_w1 if need_w1 else None,
        grad_w2 if need_w2 else None,
        grad_bias,
        None,
        None,
        None,
    )


_monarch_linear_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def _forward_macs(x_shape, w1_shape, w2_shape, *_) -> int:
    return x_shape[0] * (math.prod(w1_shape) + math.prod(w2_shape))


def _backward_macs(grad_shape, x_shape, mid_shape, w1_shape, w2_shape, need_input_grad, *_) -> int:
    # grad of the middle, grad_w2, grad_w1 (+ grad_x)
    w1, w2 = math.prod(w1_shape), math.prod(w2_shape)
    return x_shape[0] * (w1 + 2 * w2 + (w1 if need_input_grad else 0))


register_macs(torch.ops.effnn.monarch_linear, _forward_macs)
register_macs(torch.ops.effnn.monarch_linear_backward, _backward_macs)


# --------------------------------------------------------------------------------------------
# Public entry point: validation, autocast, dispatch
# --------------------------------------------------------------------------------------------

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _triton_reasons(x: Tensor, blkdiag1: Tensor, blkdiag2: Tensor) -> list[str]:
    reasons = triton_device_reasons(x.device)
    return reasons or _triton_kernels().unsupported_reasons(x, blkdiag1, blkdiag2)


def _ext_reasons(x: Tensor, blkdiag1: Tensor, blkdiag2: Tensor) -> list[str]:
    reasons = ext_device_reasons(x.device)
    if x.dtype not in (torch.float32, torch.bfloat16):
        reasons.append(f"effnn._C supports float32 and bfloat16 only, got {x.dtype}")
    return reasons


def choose_backend(x: Tensor, blkdiag1: Tensor, blkdiag2: Tensor, backend: str = "auto") -> str:
    """The backend ``monarch_linear`` runs for 2-D ``x`` (T, in_features) and these factors
    (raises BackendError if ``backend`` is forced and cannot serve them)."""
    return select_backend(
        "monarch_linear",
        backend,
        x.device,
        {
            "ref": lambda: [],
            "triton": lambda: _triton_reasons(x, blkdiag1, blkdiag2),
            "ext": lambda: _ext_reasons(x, blkdiag1, blkdiag2),
        },
    )


def _check_inputs(x, blkdiag1, blkdiag2, bias, out_features) -> None:
    for name, t in (("x", x), ("blkdiag1", blkdiag1), ("blkdiag2", blkdiag2), ("bias", bias)):
        if t is None and name == "bias":
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"monarch_linear: {name} must be a Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"monarch_linear: {name} must be a floating-point tensor (float16, bfloat16, "
                f"float32 or float64), got {t.dtype}"
            )
        if t.dtype != x.dtype:
            raise TypeError(
                f"monarch_linear: {name} has dtype {t.dtype} but x has dtype {x.dtype}; "
                "cast them to one dtype (or run under torch.autocast)"
            )
        if t.device != x.device:
            raise ValueError(
                f"monarch_linear: {name} is on {t.device} but x is on {x.device}; "
                "all tensors must be on one device"
            )
    if blkdiag1.dim() != 3 or blkdiag2.dim() != 3:
        raise ValueError(
            "monarch_linear: blkdiag1 and blkdiag2 must be 3-D (nblocks, out_block, in_block), "
            f"got shapes {tuple(blkdiag1.shape)} and {tuple(blkdiag2.shape)}"
        )
    k, q, p = blkdiag1.shape
    l, s, r = blkdiag2.shape
    if k * q != l * r:
        raise ValueError(
            f"monarch_linear: blkdiag1 {tuple(blkdiag1.shape)} produces {k * q} middle features "
            f"but blkdiag2 {tuple(blkdiag2.shape)} consumes {l * r}; they must be equal"
        )
    if x.dim() < 1:
        raise ValueError("monarch_linear: x must have at least 1 dimension (..., in_features)")
    if x.shape[-1] > k * p:
        raise ValueError(
            f"monarch_linear: x has {x.shape[-1]} features but blkdiag1 {tuple(blkdiag1.shape)} "
            f"takes at most {k * p}"
        )
    if not 1 <= out_features <= l * s:
        raise ValueError(
            f"monarch_linear: out_features must be in [1, {l * s}] for blkdiag2 "
            f"{tuple(blkdiag2.shape)}, got {out_features}"
        )
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(
            f"monarch_linear: bias must have shape ({out_features},), got {tuple(bias.shape)}"
        )


def monarch_linear(
    x: Tensor,
    blkdiag1: Tensor,
    blkdiag2: Tensor,
    bias: Tensor | None = None,
    out_features: int | None = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """Apply a Monarch matrix to ``x`` of shape (..., in_features); returns (..., out_features).

    ``out_features`` defaults to the full width l*s of ``blkdiag2``. ``backend`` is "auto", "ref",
    "triton" or "ext" (see :mod:`effnn.ops._dispatch`). Under ``torch.autocast`` all operands are
    cast to the autocast dtype; half-precision products accumulate in float32.
    """
    if out_features is None:
        out_features = blkdiag2.shape[0] * blkdiag2.shape[1]
    if isinstance(x, Tensor) and x.device.type != "meta" and torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, blkdiag1, blkdiag2, bias = (
            t.to(dtype) if isinstance(t, Tensor) else t for t in (x, blkdiag1, blkdiag2, bias)
        )
    _check_inputs(x, blkdiag1, blkdiag2, bias, out_features)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    chosen = choose_backend(x2d, blkdiag1, blkdiag2, backend)
    # the middle activation is kept only when a weight or input gradient will need it
    save_mid = torch.is_grad_enabled() and (
        x.requires_grad or blkdiag1.requires_grad or blkdiag2.requires_grad
    )
    y, _ = torch.ops.effnn.monarch_linear(
        x2d, blkdiag1, blkdiag2, bias, out_features, chosen, save_mid
    )
    # a fresh tensor for 2-D input, as nn.Linear (FSDP2 warns about views returned by a root module)
    return y if x.dim() == 2 else y.reshape(*lead, out_features)


# --------------------------------------------------------------------------------------------
# Conversions between dense and Monarch weights
# --------------------------------------------------------------------------------------------


def monarch_to_dense(
    blkdiag1: Tensor, blkdiag2: Tensor, in_features: int, out_features: int
) -> Tensor:
    """The dense (out_features, in_features) matrix the factors represent (no bias)."""
    eye = torch.eye(in_features, dtype=blkdiag1.dtype, device=blkdiag1.device)
    return monarch_linear_ref(eye, blkdiag1, blkdiag2, None, out_features).t().contiguous()


def monarch_project(weight: Tensor, nblocks: int) -> tuple[Tensor, Tensor]:
    """The Monarch factors closest to a dense ``weight`` (out, in) in Frobenius norm.

    Returns (blkdiag1, blkdiag2) in the layout of ``monarch_factor_shapes(in, out, nblocks)``.
    Block (ll, kk) of the padded weight -- rows ss*l + ll, columns kk*p + pp -- is the sum of the
    outer products w2[ll, :, rr] x w1[kk, j, :] over the middle indices i = rr*l + ll = kk*q + j
    that connect the two blocks, and no parameter appears in two blocks.
    So the optimum is a truncated SVD of every block to the number of middle indices it owns
    (q/nblocks when that divides; rank 1 for nblocks = sqrt(n), the paper's Algorithm 1), with the
    singular values split evenly between the factors. Exact for a matrix that is already Monarch.
    """
    out_features, in_features = weight.shape
    (k, q, p), (l, s, r) = monarch_factor_shapes(in_features, out_features, nblocks)
    compute_dtype = torch.promote_types(weight.dtype, torch.float32)
    w = F.pad(weight.to(compute_dtype), (0, k * p - in_features, 0, l * s - out_features))
    blocks = w.view(s, l, k, p).permute(1, 2, 0, 3)  # (l, k, s, p): block (ll, kk)
    u, sigma, vh = torch.linalg.svd(blocks, full_matrices=False)
    rank = sigma.shape[-1]
    root = sigma.sqrt()
    u = u * root.unsqueeze(-2)  # (l, k, s, m)
    vh = vh * root.unsqueeze(-1)  # (l, k, m, p)

    # For every middle index i = rr*l + ll: its block kk, its row j in blkdiag1[kk], and its rank
    # slot within block (ll, kk) (the middle indices of one block form a run of consecutive rr).
    dev = weight.device
    ll = torch.arange(l, device=dev).view(l, 1).expand(l, r)
    rr = torch.arange(r, device=dev).view(1, r).expand(l, r)
    i = rr * l + ll
    kk, j = i // q, i % q
    first_rr = torch.div(kk * q - ll + l - 1, l, rounding_mode="floor").clamp_min(0)
    slot = rr - first_rr
    kept = (slot < rank).to(compute_dtype)
    slot = slot.clamp_max(rank - 1)

    cols = u[ll, kk, :, slot] * kept.unsqueeze(-1)  # (l, r, s): w2[ll, :, rr]
    rows = vh[ll, kk, slot, :] * kept.unsqueeze(-1)  # (l, r, p): w1[kk, j, :]
    blkdiag2 = cols.transpose(1, 2).contiguous()
    blkdiag1 = torch.zeros(k, q, p, dtype=compute_dtype, device=dev)
    blkdiag1[kk.reshape(-1), j.reshape(-1)] = rows.reshape(-1, p)
    return blkdiag1.to(weight.dtype), blkdiag2.to(weight.dtype)
