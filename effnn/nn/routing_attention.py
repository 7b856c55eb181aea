"""``BiLevelRoutingAttention``: BiFormer's bi-level routing attention, checkpoint-compatible with
the official ``ops/bra_legacy.py`` (and, through :func:`convert_nchw_state_dict`, ``ops/bra_nchw.py``)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from effnn.ops._dispatch import BACKENDS
from effnn.ops.routing_attention import (
    KV_DOWNSAMPLE_MODES,
    RegionGrid,
    Routing,
    bi_level_routing_attention,
    padding_mode,
    region_grid,
)

__all__ = ["BiLevelRoutingAttention", "convert_nchw_state_dict"]


class _QKVLinear(nn.Module):
    """Holds the fused projection under the official name ``qkv.qkv`` (rows q | k | v)."""

    def __init__(self, dim: int, qk_dim: int, **factory) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 2 * qk_dim + dim, **factory)


class _Router(nn.Module):
    """Holds the routing projection of ``param_routing`` under the official name ``router.emb``."""

    def __init__(self, qk_dim: int, **factory) -> None:
        super().__init__()
        self.emb = nn.Linear(qk_dim, qk_dim, **factory)


class BiLevelRoutingAttention(nn.Module):
    r"""Bi-level routing attention (Zhu et al., "BiFormer: Vision Transformer with Bi-Level Routing
    Attention", CVPR 2023), exactly as the official ``ops/bra_legacy.py`` of rayleizhu/BiFormer.

    The map is cut into ``n_win x n_win`` regions. Region-level queries and keys (the means of each
    region's tokens, detached unless ``diff_routing``) give a region affinity graph; each query
    region keeps its ``topk`` most affine regions (one graph for all heads), and its tokens attend
    to the tokens of those regions only, per head, with scale ``qk_scale or qk_dim ** -0.5`` (the
    full qk width, not the head width). A depthwise ``side_dwconv`` x ``side_dwconv`` conv of the
    full-resolution V map (local context enhancement, ``lepe``) is added before the output
    projection ``wo``.

    Parameters have the official names and shapes, so official weights load with
    ``load_state_dict``: ``qkv.qkv.weight`` (2*qk_dim + dim, dim) and ``qkv.qkv.bias`` (rows q | k |
    v), ``wo.weight``/``wo.bias`` (``param_attention="qkvo"``; ``"qkv"`` has no ``wo``),
    ``lepe.weight`` (dim, 1, K, K)/``lepe.bias`` (when ``side_dwconv > 0``), and
    ``router.emb.weight``/``router.emb.bias`` (qk_dim, qk_dim) with ``param_routing``.

    Args:
        dim: channels C of the input and output.
        num_heads: attention heads; must divide ``dim`` and ``qk_dim``.
        n_win: regions per side.
        qk_dim: channels of queries and keys (default ``dim``).
        qk_scale: logit scale (default ``qk_dim ** -0.5``).
        topk: regions each query region attends to.
        side_dwconv: kernel size of the LCE (odd; 0 or less: no LCE). Every BiFormer model uses 5.
        param_attention: "qkvo" (with ``wo``) or "qkv" (without).
        param_routing: a learned linear ``router.emb`` on the region queries and keys (needs
            ``diff_routing``).
        diff_routing: let gradients flow through the routing (needs ``soft_routing``: the official
            differentiable hard routing is not implemented there either).
        soft_routing: multiply the routed keys and values by the softmax of their region affinity.
        auto_pad: what to do when H or W is not a multiple of ``n_win``: False (refuse), True or
            "legacy" (the official ``auto_pad=True``: zero-pad the input before the projections),
            "nchw" (the padding of the official ``ops/bra_nchw.py``), or "masked" (effnn's own:
            padded keys are masked out of the softmax; not checkpoint-equivalent). All four agree
            when the sizes divide. See :data:`effnn.ops.routing_attention.PADDING_MODES`.
        kv_downsample_mode: per-region pooling of keys and values, one of
            :data:`effnn.ops.routing_attention.KV_DOWNSAMPLE_MODES` (released models: "identity").
        kv_per_win: pooled keys per region side for "ada_avgpool"/"ada_maxpool".
        kv_downsample_ratio: pooling stride for "avgpool"/"maxpool".
        backend: "auto", "ref" or "triton" (the routed attention's implementation; "auto" picks
            the Triton kernel for fp32/fp16/bf16 CUDA tensors, the reference otherwise).

    Shape: input (N, H, W, C) channels-last, output (N, H, W, C). ``forward(x, return_routing=True)``
    returns ``(output, routing)``, a :class:`effnn.ops.routing_attention.Routing` with the routed
    region ``indices`` and ``weights`` (N, P, topk) and the region grid, which
    :func:`effnn.viz.plot_routing` draws.

    Example::

        >>> attn = BiLevelRoutingAttention(64, num_heads=2, n_win=7, topk=1, side_dwconv=5)
        >>> x = torch.randn(2, 56, 56, 64)
        >>> attn(x).shape
        torch.Size([2, 56, 56, 64])
        >>> out, routing = attn(x, return_routing=True)
        >>> routing.indices.shape  # 49 query regions, 1 routed region each
        torch.Size([2, 49, 1])
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        n_win: int = 7,
        qk_dim: int | None = None,
        qk_scale: float | None = None,
        topk: int = 4,
        side_dwconv: int = 3,
        param_attention: str = "qkvo",
        param_routing: bool = False,
        diff_routing: bool = False,
        soft_routing: bool = False,
        auto_pad: bool | str = False,
        kv_downsample_mode: str = "identity",
        kv_per_win: int = 4,
        kv_downsample_ratio: int = 4,
        backend: str = "auto",
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        qk_dim = dim if qk_dim is None else qk_dim
        for arg, value in (("dim", dim), ("num_heads", num_heads), ("n_win", n_win),
                           ("qk_dim", qk_dim), ("topk", topk), ("kv_per_win", kv_per_win),
                           ("kv_downsample_ratio", kv_downsample_ratio)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: {arg} must be a positive int, got {value!r}")
        if dim % num_heads or qk_dim % num_heads:
            raise ValueError(
                f"{name}: dim={dim} and qk_dim={qk_dim} must be divisible by num_heads={num_heads}"
            )
        mode = padding_mode(auto_pad)
        if topk > n_win * n_win and mode != "nchw":  # "nchw" can cut more regions (checked per input)
            raise ValueError(f"{name}: topk={topk} exceeds the n_win**2={n_win * n_win} regions")
        if qk_scale is not None and not (isinstance(qk_scale, (int, float)) and qk_scale > 0):
            raise ValueError(f"{name}: qk_scale must be None or a positive number, got {qk_scale!r}")
        if isinstance(side_dwconv, bool) or not isinstance(side_dwconv, int) or (
            side_dwconv > 0 and side_dwconv % 2 == 0
        ):
            raise ValueError(
                f"{name}: side_dwconv must be an odd kernel size or <= 0 (no LCE), got {side_dwconv!r}"
            )
        if param_attention not in ("qkvo", "qkv"):
            raise ValueError(f"{name}: param_attention must be 'qkvo' or 'qkv', got {param_attention!r}")
        if param_routing and not diff_routing:
            raise ValueError(f"{name}: param_routing=True needs diff_routing=True (as the official code asserts)")
        if diff_routing and not soft_routing:
            raise NotImplementedError(
                f"{name}: diff_routing=True needs soft_routing=True; differentiable hard routing is "
                "not implemented (the official KVGather raises NotImplementedError for it)"
            )
        if kv_downsample_mode in ("fracpool", "conv"):
            raise NotImplementedError(
                f"{name}: kv_downsample_mode={kv_downsample_mode!r} is not implemented (the official "
                f"ops/bra_legacy.py raises NotImplementedError for it); use one of {KV_DOWNSAMPLE_MODES}"
            )
        if kv_downsample_mode not in KV_DOWNSAMPLE_MODES:
            raise ValueError(f"{name}: kv_downsample_mode must be one of {KV_DOWNSAMPLE_MODES}, got {kv_downsample_mode!r}")
        if kv_downsample_mode != "identity" and mode in ("nchw", "masked"):
            raise ValueError(
                f"{name}: kv_downsample_mode={kv_downsample_mode!r} works with auto_pad False or "
                f"True ('legacy') only, got auto_pad={auto_pad!r}"
            )
        if backend not in BACKENDS:
            raise ValueError(f"{name}: backend must be one of {BACKENDS}, got {backend!r}")

        self.dim = dim
        self.num_heads = num_heads
        self.n_win = n_win
        self.qk_dim = qk_dim
        self.scale = float(qk_scale) if qk_scale is not None else qk_dim ** -0.5
        self.topk = topk
        self.side_dwconv = side_dwconv
        self.param_attention = param_attention
        self.param_routing = param_routing
        self.diff_routing = diff_routing
        self.soft_routing = soft_routing
        self.auto_pad = auto_pad
        self.kv_downsample_mode = kv_downsample_mode
        self.kv_per_win = kv_per_win
        self.kv_downsample_ratio = kv_downsample_ratio
        self.backend = backend

        factory = {"device": device, "dtype": dtype}
        # registration order as the official module: lepe, router, qkv, wo
        self.lepe = (
            nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim, **factory)
            if side_dwconv > 0 else None
        )
        self.router = _Router(qk_dim, **factory) if param_routing else None
        self.qkv = _QKVLinear(dim, qk_dim, **factory)
        self.wo = nn.Linear(dim, dim, **factory) if param_attention == "qkvo" else None

    def reset_parameters(self) -> None:
        """PyTorch's default initialisation of each part, as in the official module (BiFormer
        models re-initialise linears with trunc_normal(0.02) themselves)."""
        for module in (self.lepe, self.router, self.qkv, self.wo):
            if module is not None:
                for m in module.modules():
                    if isinstance(m, (nn.Linear, nn.Conv2d)):
                        m.reset_parameters()

    def region_grid(self, height: int, width: int) -> RegionGrid:
        """The region layout used for an ``height x width`` input."""
        return region_grid(height, width, self.n_win, self.auto_pad)

    def forward(self, x: Tensor, return_routing: bool = False) -> Tensor | tuple[Tensor, Routing]:
        name = type(self).__name__
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}: input must be a Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[-1] != self.dim:
            raise ValueError(
                f"{name}: input must be channels-last (N, H, W, {self.dim}), got shape {tuple(x.shape)}"
            )
        weight = self.qkv.qkv.weight
        if not x.is_floating_point():
            raise TypeError(f"{name}: input must be a floating-point tensor, got {x.dtype}")
        if x.device != weight.device:
            raise ValueError(f"{name}: input is on {x.device} but the parameters are on {weight.device}")
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"{name}: input has dtype {x.dtype} but the parameters have dtype {weight.dtype}; "
                "cast one of them (or run under torch.autocast)"
            )
        return bi_level_routing_attention(
            x,
            weight,
            self.qkv.qkv.bias,
            None if self.wo is None else self.wo.weight,
            None if self.wo is None else self.wo.bias,
            None if self.lepe is None else self.lepe.weight,
            None if self.lepe is None else self.lepe.bias,
            num_heads=self.num_heads,
            n_win=self.n_win,
            qk_dim=self.qk_dim,
            topk=self.topk,
            scale=self.scale,
            router_weight=None if self.router is None else self.router.emb.weight,
            router_bias=None if self.router is None else self.router.emb.bias,
            diff_routing=self.diff_routing,
            soft_routing=self.soft_routing,
            auto_pad=self.auto_pad,
            kv_downsample_mode=self.kv_downsample_mode,
            kv_per_win=self.kv_per_win,
            kv_downsample_ratio=self.kv_downsample_ratio,
            backend=self.backend,
            return_routing=return_routing,
        )

    def extra_repr(self) -> str:
        parts = [f"dim={self.dim}", f"num_heads={self.num_heads}", f"n_win={self.n_win}",
                 f"topk={self.topk}"]
        if self.qk_dim != self.dim:
            parts.append(f"qk_dim={self.qk_dim}")
        if not math.isclose(self.scale, self.qk_dim ** -0.5):
            parts.append(f"qk_scale={self.scale}")
        for flag in ("param_routing", "diff_routing", "soft_routing"):
            if getattr(self, flag):
                parts.append(f"{flag}=True")
        if self.auto_pad is not False:
            parts.append(f"auto_pad={self.auto_pad!r}")
        if self.kv_downsample_mode != "identity":
            parts.append(f"kv_downsample_mode={self.kv_downsample_mode!r}")
        return ", ".join(parts)


_NCHW_RENAMES = {"qkv_linear": "qkv.qkv", "output_linear": "wo"}


def convert_nchw_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Map the weights of the official channels-first ``ops/bra_nchw.py`` (``nchwBRA``) to this
    module's names: ``qkv_linear.weight`` (3C, C, 1, 1) -> ``qkv.qkv.weight`` (3C, C),
    ``output_linear.weight`` (C, C, 1, 1) -> ``wo.weight`` (C, C), biases renamed, ``lepe.*``
    unchanged. Keys may carry a prefix (a whole model's state dict); other keys pass through.

    With the converted weights, ``BiLevelRoutingAttention(dim, num_heads, n_win, topk=topk,
    side_dwconv=side_dwconv, auto_pad="nchw")`` applied to ``x.permute(0, 2, 3, 1)`` gives
    ``nchwBRA(dim, num_heads, n_win, topk=topk, side_dwconv=side_dwconv)(x).permute(0, 2, 3, 1)``
    for any input size (the q/k/v row order and the head-major channel split are the same).
    """
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        prefix, _, owner = prefix.rpartition(".")
        if owner in _NCHW_RENAMES and leaf in ("weight", "bias"):
            new = (prefix + "." if prefix else "") + _NCHW_RENAMES[owner] + "." + leaf
            out[new] = value.flatten(1) if leaf == "weight" else value
        else:
            out[key] = value
    return out
