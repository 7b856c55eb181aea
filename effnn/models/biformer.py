"""BiFormer (Zhu et al., "BiFormer: Vision Transformer with Bi-Level Routing Attention", CVPR 2023):
the BiFormer-T/S/B image classifiers and their multi-scale backbones for detection and
segmentation, built from :class:`effnn.BiLevelRoutingAttention`.

The structure, configurations and state-dict keys are those of the official ``models/biformer.py``
(``BiFormer``, ``Block``, ``biformer_tiny/small/base``) and ``models/_common.py``
(``AttentionLePE``) of rayleizhu/BiFormer, so the released ImageNet checkpoints load with
``load_state_dict(strict=True)``:

- ``downsample_layers.0``: the stem, conv 3x3/2 (C0/2) - BN - GELU - conv 3x3/2 (C0) - BN (keys
  ``.0 .1 .3 .4``); ``downsample_layers.{1,2,3}``: conv 3x3/2 - BN (keys ``.0 .1``).
- ``stages.i.j``: one block: ``pos_embed`` (depthwise 3x3 conv, added to the block input),
  ``norm1`` (LayerNorm, eps 1e-6), ``attn``, ``norm2``, ``mlp.0`` / ``mlp.3`` (Linear C -> rC -> C,
  GELU between; indices 1 and 2 hold the parameter-free Identity and GELU of the official
  ``nn.Sequential``). Pre-norm residuals with stochastic depth, no layer scale (the released
  configuration: ``pre_norm=True``, ``layer_scale_init_value=-1``).
- ``attn`` of stages 1-3 (``topk > 0``): ``BiLevelRoutingAttention`` (``attn.qkv.qkv``,
  ``attn.wo``, ``attn.lepe``), heads = qk_dim // 32; of stage 4 (the official ``topk=-2``):
  :class:`AttentionLePE`, full attention (``attn.qkv`` without bias, ``attn.proj``,
  ``attn.lepe``).
- ``norm``: BatchNorm2d of the last map; ``head``: Linear on its spatial mean.

With ``features_only=True`` the model is the official dense-task backbone ``BiFormer_mm``
(``object_detection/`` and ``semantic_segmentation/models_mm/biformer_mm.py``): no ``norm`` and
``head``, ``extra_norms.i`` (a channels-first LayerNorm, timm's ``LayerNorm2d``) on each stage's
output, and ``forward`` returns the list of the four NCHW maps (strides 4, 8, 16, 32).

Configurations (official factories). Parameters; multiply-adds of one 224x224 image as fvcore
counts them (the official counter, ``main.py``; pass ``effnn.flops.fvcore_handles()`` and a handle
for ``aten::scaled_dot_product_attention``, see docs/models.md):

============== =============== =================== ===== ========= ============ =============
model          depth           embed_dim           mlp   heads     params       fvcore FLOPs
============== =============== =================== ===== ========= ============ =============
biformer_tiny  2, 2, 8, 2      64, 128, 256, 512   3     2/4/8/8   13,142,760   2,228,044,160
biformer_small 4, 4, 18, 4     64, 128, 256, 512   3     2/4/8/8   25,536,232   4,487,312,640
biformer_base  4, 4, 18, 4     96, 192, 384, 768   3     3/6/12/8  56,804,968   9,794,514,816
============== =============== =================== ===== ========= ============ =============

All three: ``n_win=7``, ``topks=(1, 4, 16, -2)``, ``side_dwconv=5``, ``qk_dims=embed_dim``,
``head_dim=32``, ``kv_downsample_mode="identity"``, no parameterised / differentiable / soft
routing, ``before_attn_dwconv=3``, ``drop_path_rate=0`` (pass the training value: the official
README trains small with 0.15, ``main.py``'s default is 0.1; the dense-task configs use 0.2-0.3).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effnn.nn.routing_attention import BiLevelRoutingAttention
from effnn.ops.routing_attention import padding_mode

__all__ = [
    "AttentionLePE",
    "BiFormer",
    "LayerNorm2d",
    "biformer_base",
    "biformer_small",
    "biformer_tiny",
    "checkpoint_filter_fn",
    "load_official_checkpoint",
]

#: topks entry of a stage of full attention with LePE (the official ``Block``'s ``topk=-2``)
FULL_ATTENTION = -2

#: The official download links (``models/biformer.py`` ``model_urls``); effnn downloads nothing.
OFFICIAL_URLS = {
    "biformer_tiny": "https://api.onedrive.com/v1.0/shares/s!AkBbczdRlZvChHEOoGkgwgQzEDlM/root/content",
    "biformer_small": "https://api.onedrive.com/v1.0/shares/s!AkBbczdRlZvChHDyM-x9KWRBZ832/root/content",
    "biformer_base": "https://api.onedrive.com/v1.0/shares/s!AkBbczdRlZvChHI_XPhoadjaNxtO/root/content",
}


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: zero the residual branch of whole samples with probability ``p``, scale
    the kept ones by 1 / (1 - p) (timm's ``DropPath``, which the official blocks use)."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - p)
    return x * keep.div_(1.0 - p)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (timm's ``LayerNorm2d``, eps 1e-6): the
    ``extra_norms`` of the official dense-task backbone."""

    def __init__(self, num_channels: int, eps: float = 1e-6, **factory) -> None:
        super().__init__(num_channels, eps=eps, **factory)

    def forward(self, x: Tensor) -> Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class AttentionLePE(nn.Module):
    """Full multi-head self-attention with a locally-enhanced positional encoding, the official
    ``models/_common.py`` ``AttentionLePE`` (BiFormer's stage 4).

    ``out = proj(attention(q, k, v) + lepe(x))``: ``qkv`` has no bias, the scale is
    ``qk_scale or head_dim ** -0.5``, and ``lepe`` is a depthwise ``side_dwconv`` conv of the
    attention's *input* x (not of V, unlike BRA's LCE). Keys ``qkv.weight`` (3C, C),
    ``proj.weight``/``proj.bias``, ``lepe.weight`` (C, 1, K, K)/``lepe.bias``.

    Shape: (N, H, W, C) channels-last -> (N, H, W, C); any H, W.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qk_scale: float | None = None,
        side_dwconv: int = 5,
        **factory,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"AttentionLePE: dim={dim} is not divisible by num_heads={num_heads}")
        if side_dwconv < 1 or side_dwconv % 2 == 0:
            raise ValueError(f"AttentionLePE: side_dwconv must be a positive odd size, got {side_dwconv}")
        self.dim = dim
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False, **factory)
        self.proj = nn.Linear(dim, dim, **factory)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim, **factory)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[-1] != self.dim:
            raise ValueError(
                f"AttentionLePE: input must be channels-last (N, H, W, {self.dim}), got {tuple(x.shape)}"
            )
        n, h, w, c = x.shape
        qkv = self.qkv(x).reshape(n, h * w, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], scale=self.scale)
        out = out.transpose(1, 2).reshape(n, h, w, c)
        lepe = self.lepe(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.proj(out + lepe)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}"


class Block(nn.Module):
    """One BiFormer block (official ``models/biformer.py`` ``Block``, released configuration):
    NCHW in and out; ``x += pos_embed(x)``, then pre-norm attention and MLP residuals on the
    channels-last map."""

    def __init__(
        self,
        dim: int,
        topk: int,
        num_heads: int,
        qk_dim: int,
        n_win: int,
        mlp_ratio: float,
        side_dwconv: int,
        before_attn_dwconv: int,
        drop_path: float,
        auto_pad: bool | str,
        backend: str,
        **factory,
    ) -> None:
        super().__init__()
        self.drop_path = drop_path
        # official: Conv2d(dim, dim, before_attn_dwconv, padding=1, groups=dim); padding k // 2
        # is the same for the released k = 3 and keeps the map size for other k
        self.pos_embed = (
            nn.Conv2d(dim, dim, before_attn_dwconv, padding=before_attn_dwconv // 2, groups=dim, **factory)
            if before_attn_dwconv > 0 else None
        )
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, **factory)
        if topk > 0:
            self.attn = BiLevelRoutingAttention(
                dim, num_heads=num_heads, n_win=n_win, qk_dim=qk_dim, topk=topk,
                side_dwconv=side_dwconv, auto_pad=auto_pad, backend=backend, **factory,
            )
        else:  # FULL_ATTENTION: the official Block builds AttentionLePE(dim, side_dwconv=...), 8 heads
            self.attn = AttentionLePE(dim, side_dwconv=side_dwconv, **factory)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, **factory)
        hidden = int(mlp_ratio * dim)
        # indices as the official nn.Sequential(Linear, Identity (no mlp_dwconv), GELU, Linear)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden, **factory), nn.Identity(), nn.GELU(), nn.Linear(hidden, dim, **factory)
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.pos_embed is not None:
            x = x + self.pos_embed(x)
        x = x.permute(0, 2, 3, 1)
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        x = x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)
        return x.permute(0, 3, 1, 2)


def _stem(in_chans: int, dim: int, **factory) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_chans, dim // 2, 3, stride=2, padding=1, **factory),
        nn.BatchNorm2d(dim // 2, **factory),
        nn.GELU(),
        nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1, **factory),
        nn.BatchNorm2d(dim, **factory),
    )


def _merging(dim_in: int, dim_out: int, **factory) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(dim_in, dim_out, 3, stride=2, padding=1, **factory),
        nn.BatchNorm2d(dim_out, **factory),
    )


class BiFormer(nn.Module):
    """BiFormer backbone and classifier, official parameter names (see the module docstring).

    Args:
        depth: blocks per stage (the official models have 4 stages; fewer or more work the same).
        embed_dim: channels per stage.
        mlp_ratios: MLP expansion per stage.
        topks: per stage, the regions each query region attends to (BRA), or -2
            (:data:`FULL_ATTENTION`) for full attention with LePE (:class:`AttentionLePE`).
        qk_dims: query/key width per BRA stage (default ``embed_dim``); BRA heads = qk_dim //
            ``head_dim``.
        head_dim: head width of the BRA stages (the full-attention stage has 8 heads, as
            officially).
        n_win: regions per side in every BRA stage.
        side_dwconv: kernel of BRA's LCE and of AttentionLePE's LePE.
        before_attn_dwconv: kernel of each block's depthwise ``pos_embed`` conv (0: none).
        drop_path_rate: stochastic depth, rising linearly over all blocks from 0.
        auto_pad: BRA's padding mode (False: each BRA stage's map must divide by ``n_win``; True
            or "legacy": the official padding, which the dense-task configs use; "nchw";
            "masked"). See :class:`effnn.BiLevelRoutingAttention`.
        in_chans, num_classes: input channels; classes (0: ``head`` is the identity).
        features_only: build the dense-task backbone (``extra_norms``, no ``norm``/``head``);
            ``forward`` returns the stage maps.
        backend: BRA's backend ("auto" or "ref").
        device, dtype: as for ``nn.Linear``; ``device="meta"`` allocates nothing.

    Shape: (N, in_chans, H, W) -> (N, num_classes); with ``features_only``, a list of
    (N, embed_dim[i], H_i, W_i) with H_0 = ceil(H / 4) and H_{i+1} = ceil(H_i / 2).
    """

    def __init__(
        self,
        depth: Sequence[int] = (2, 2, 8, 2),
        embed_dim: Sequence[int] = (64, 128, 256, 512),
        mlp_ratios: Sequence[float] = (3, 3, 3, 3),
        topks: Sequence[int] = (1, 4, 16, FULL_ATTENTION),
        qk_dims: Sequence[int] | None = None,
        head_dim: int = 32,
        n_win: int = 7,
        side_dwconv: int = 5,
        before_attn_dwconv: int = 3,
        drop_path_rate: float = 0.0,
        auto_pad: bool | str = False,
        in_chans: int = 3,
        num_classes: int = 1000,
        features_only: bool = False,
        backend: str = "auto",
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        num_stages = len(depth)
        qk_dims = tuple(embed_dim) if qk_dims is None else tuple(qk_dims)
        for arg, value in (("embed_dim", embed_dim), ("mlp_ratios", mlp_ratios), ("topks", topks),
                           ("qk_dims", qk_dims)):
            if len(value) != num_stages:
                raise ValueError(
                    f"{name}: {arg} must have one entry per stage ({num_stages}, from depth), got {tuple(value)}"
                )
        for i, topk in enumerate(topks):
            if topk != FULL_ATTENTION and topk < 1:
                raise ValueError(
                    f"{name}: topks[{i}]={topk}: must be a positive top-k (BRA) or {FULL_ATTENTION} "
                    "(full attention with LePE); the official -1 and 0 variants are unused by any "
                    "released model and not implemented"
                )
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"{name}: drop_path_rate must be in [0, 1), got {drop_path_rate}")
        padding_mode(auto_pad)  # validates it
        factory = {"device": device, "dtype": dtype}

        self.embed_dim = tuple(embed_dim)
        self.num_classes = num_classes
        self.n_win = n_win
        self.topks = tuple(topks)
        self.auto_pad = auto_pad
        self.features_only = features_only
        # timm's feature description: channels and stride of each stage map
        self.feature_info = [
            {"num_chs": c, "reduction": 4 * 2**i, "module": f"stages.{i}"} for i, c in enumerate(embed_dim)
        ]

        self.downsample_layers = nn.ModuleList(
            [_stem(in_chans, embed_dim[0], **factory)]
            + [_merging(embed_dim[i], embed_dim[i + 1], **factory) for i in range(num_stages - 1)]
        )
        rates = torch.linspace(0, drop_path_rate, sum(depth), device="cpu").tolist()  # as official
        self.stages = nn.ModuleList()
        for i in range(num_stages):
            first = sum(depth[:i])
            self.stages.append(nn.Sequential(*[
                Block(embed_dim[i], topks[i], qk_dims[i] // head_dim, qk_dims[i], n_win,
                      mlp_ratios[i], side_dwconv, before_attn_dwconv, rates[first + j], auto_pad,
                      backend, **factory)
                for j in range(depth[i])
            ]))
        if features_only:
            self.extra_norms = nn.ModuleList([LayerNorm2d(c, **factory) for c in embed_dim])
        else:
            self.norm = nn.BatchNorm2d(embed_dim[-1], **factory)
            self.head = nn.Linear(embed_dim[-1], num_classes, **factory) if num_classes > 0 else nn.Identity()
        if device is None or torch.device(device).type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The official initialisation (``BiFormer._init_weights`` applied to every module):
        linears truncated normal(0.02) with zero biases, LayerNorms 1 / 0; convolutions and
        BatchNorms PyTorch's defaults."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.Conv2d, nn.BatchNorm2d)):
                m.reset_parameters()

    def get_classifier(self) -> nn.Module:
        return self.head

    def _check_size(self, height: int, width: int) -> None:
        """Without padding, every BRA stage's map must divide into n_win x n_win regions: say
        which stage does not, in terms of the input size."""
        if self.auto_pad is not False:
            return
        h, w = -(-height // 4), -(-width // 4)
        for i, topk in enumerate(self.topks):
            if topk != FULL_ATTENTION and (h % self.n_win or w % self.n_win):
                raise ValueError(
                    f"{type(self).__name__}: a {height}x{width} input gives a {h}x{w} map at stage "
                    f"{i + 1}, not divisible by n_win={self.n_win}; use an input size that is a "
                    f"multiple of {4 * 2**i * self.n_win}, or auto_pad=True (the official padding) "
                    "or auto_pad='masked'"
                )
            h, w = -(-h // 2), -(-w // 2)

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        """The output of every stage, (N, embed_dim[i], H_i, W_i), before any final norm."""
        if x.dim() != 4:
            raise ValueError(f"{type(self).__name__}: input must be (N, C, H, W), got {tuple(x.shape)}")
        self._check_size(x.shape[-2], x.shape[-1])
        maps = []
        for downsample, stage in zip(self.downsample_layers, self.stages, strict=True):
            x = stage(downsample(x))
            maps.append(x)
        return maps

    def forward_features(self, x: Tensor) -> Tensor | list[Tensor]:
        """Classifier: the normalised last map (N, C, H/32, W/32); ``features_only``: the
        normalised stage maps (the official ``BiFormer_mm.forward_features``)."""
        maps = self.forward_stages(x)
        if self.features_only:
            return [norm(m) for norm, m in zip(self.extra_norms, maps, strict=True)]
        return self.norm(maps[-1])

    def forward_head(self, x: Tensor) -> Tensor:
        return self.head(x.flatten(2).mean(-1))

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        if self.features_only:
            return self.forward_features(x)
        return self.forward_head(self.forward_features(x))


# --------------------------------------------------------------------------------------------
# Official checkpoints
# --------------------------------------------------------------------------------------------


def checkpoint_filter_fn(checkpoint: Mapping[str, Any], model: BiFormer | None = None) -> dict[str, Tensor]:
    """The state dict of an official checkpoint, for ``model.load_state_dict``.

    Unwraps the training checkpoint (``checkpoint["model"]`` of the ImageNet releases, or
    ``["state_dict"]`` of the mmdet/mmseg ones), keeps the ``backbone.`` weights of a dense-task
    checkpoint without that prefix, and, for a ``features_only`` model, drops the classifier's
    ``norm.*`` and ``head.*``. Keys are otherwise the official ones, unchanged.
    """
    for wrapper in ("model", "state_dict"):
        if isinstance(checkpoint.get(wrapper), Mapping):
            checkpoint = checkpoint[wrapper]
            break
    state = dict(checkpoint)
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    if model is not None and model.features_only:
        state = {k: v for k, v in state.items() if not k.startswith(("norm.", "head."))}
    return state


def load_official_checkpoint(model: BiFormer, path: str) -> None:
    """Load an official BiFormer checkpoint file into ``model`` without unpickling arbitrary
    objects (``torch.load(weights_only=True)``; the training ``args`` that ``main.py`` saves
    beside the weights are an ``argparse.Namespace``, allowed as such).

    Every key must match (``strict``), except that a ``features_only`` model loaded from an
    ImageNet checkpoint keeps its freshly initialised ``extra_norms``, as the official dense-task
    backbones do (they load with ``strict=False``).
    """
    with torch.serialization.safe_globals([argparse.Namespace]):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    result = model.load_state_dict(checkpoint_filter_fn(checkpoint, model), strict=False)
    missing = [k for k in result.missing_keys if not (model.features_only and k.startswith("extra_norms."))]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"load_official_checkpoint: {path} does not match the model: missing keys {missing}, "
            f"unexpected keys {result.unexpected_keys}"
        )


# --------------------------------------------------------------------------------------------
# Factories (official configurations)
# --------------------------------------------------------------------------------------------

_CONFIGS = {
    "biformer_tiny": {"depth": (2, 2, 8, 2), "embed_dim": (64, 128, 256, 512)},
    "biformer_small": {"depth": (4, 4, 18, 4), "embed_dim": (64, 128, 256, 512)},
    "biformer_base": {"depth": (4, 4, 18, 4), "embed_dim": (96, 192, 384, 768)},
}


def _pretrained_cfg(name: str) -> dict[str, Any]:
    """timm's data configuration of the official models (they set timm's ViT ``_cfg()``)."""
    return {
        "architecture": name, "url": OFFICIAL_URLS[name], "num_classes": 1000,
        "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.9, "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
        "first_conv": "downsample_layers.0.0", "classifier": "head",
    }


def _create(name: str, pretrained: bool, pretrained_cfg_overlay: Mapping[str, Any] | None,
            kwargs: dict[str, Any]) -> BiFormer:
    kwargs.pop("pretrained_cfg", None)  # timm's create_model passes these; effnn downloads nothing
    kwargs.pop("cache_dir", None)
    model = BiFormer(**{**_CONFIGS[name], **kwargs})
    model.pretrained_cfg = model.default_cfg = _pretrained_cfg(name)
    if pretrained:
        path = (pretrained_cfg_overlay or {}).get("file")
        if path is None:
            raise ValueError(
                f"{name}: pretrained=True needs a local file, pretrained_cfg_overlay={{'file': path}} "
                f"(effnn downloads nothing; the official checkpoint is at {OFFICIAL_URLS[name]}, "
                "whose OneDrive links official issue #53 reports broken)"
            )
        load_official_checkpoint(model, path)
    return model


def biformer_tiny(pretrained: bool = False, pretrained_cfg_overlay: Mapping[str, Any] | None = None,
                  **kwargs: Any) -> BiFormer:
    """BiFormer-T: 13.1M parameters, 2.2 GFLOPs (fvcore) at 224x224, 81.4% ImageNet top-1.

    Args:
        pretrained: load the official weights from the local file named by
            ``pretrained_cfg_overlay={"file": path}`` (timm's convention for local weights).
        **kwargs: overrides of :class:`BiFormer` arguments (``num_classes``, ``drop_path_rate``,
            ``features_only``, ``auto_pad``, ``n_win``, ``device``, ...).

    Example::

        >>> model = biformer_tiny(device="meta")
        >>> sum(p.numel() for p in model.parameters())
        13142760
    """
    return _create("biformer_tiny", pretrained, pretrained_cfg_overlay, kwargs)


def biformer_small(pretrained: bool = False, pretrained_cfg_overlay: Mapping[str, Any] | None = None,
                   **kwargs: Any) -> BiFormer:
    """BiFormer-S: 25.5M parameters, 4.5 GFLOPs at 224x224, 83.8% ImageNet top-1; the backbone of
    the official detection (``n_win=16``) and segmentation (``n_win=8``) models, which use
    ``features_only=True, auto_pad=True``. Arguments as :func:`biformer_tiny`."""
    return _create("biformer_small", pretrained, pretrained_cfg_overlay, kwargs)


def biformer_base(pretrained: bool = False, pretrained_cfg_overlay: Mapping[str, Any] | None = None,
                  **kwargs: Any) -> BiFormer:
    """BiFormer-B: 56.8M parameters, 9.8 GFLOPs at 224x224, 84.3% ImageNet top-1. Arguments as
    :func:`biformer_tiny`."""
    return _create("biformer_base", pretrained, pretrained_cfg_overlay, kwargs)


def _register_with_timm() -> None:
    """Make ``timm.create_model("biformer_tiny", ...)`` work when timm is installed (timm stays
    optional)."""
    try:
        from timm.models import register_model
    except ImportError:
        return
    for factory in (biformer_tiny, biformer_small, biformer_base):
        register_model(factory)


_register_with_timm()
