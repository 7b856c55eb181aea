"""GBLR ViT-B/16 (Lee & Kim, "Differentiable Learning of Generalized Structured Matrices for
Efficient Deep Neural Networks", ICLR 2024, ImageNet experiment), with the official module layout.

The official model (changwoolee/Gaudi-GBLR, ``configs/experiment/imagenet/vit/vit-b-gaudi.yaml``
on ``src/models/vit/vit.py`` and ``src/models/modules/vision_common.py::AttentionSimple``) is
timm's ViT-B/16 in which every block's query, key and value projections are separate
``GaudiGBLR`` layers (``packed_linear`` is off once a linear config is given) and the MLP's
``fc1``, ``fc2`` are ``GaudiGBLR`` (``MlpCustom``), all with ``rank_per_component=1`` and
``total_rank_ratio=1`` (K = min(in, out) = 768 components), 'splr' widths and locations at 0. The
attention output projection ``attn.proj``, the patch embedding and the head stay dense.

Parameter names: ``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.N.{norm1,
attn.q_proj, attn.k_proj, attn.v_proj, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm``, ``head``;
the GBLR layers hold the official ``widths``, ``locations``, ``lr_weight1``, ``lr_weight2``,
``bias`` and buffers ``freq_in``, ``freq_out``, ``sigma``. An official Lightning checkpoint
stores them under ``model.`` (strip that prefix).

The official complexity count of this model is :func:`effnn.train.gblr.official_complexity`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effnn.models.vit import VisionTransformer
from effnn.nn.gblr import GaudiGBLRLinear

__all__ = ["GBLRAttention", "GBLRVisionTransformer", "vit_base_patch16_224_gblr"]


class GBLRAttention(nn.Module):
    """Multi-head self-attention with separate GBLR query/key/value projections and a dense output
    projection (the official ``AttentionSimple`` with ``packed_linear=False``, softmax attention).

    Shape: (B, N, dim) -> (B, N, dim).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, **gblr) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"GBLRAttention: dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.q_proj = GaudiGBLRLinear(dim, dim, bias=qkv_bias, **gblr)
        self.k_proj = GaudiGBLRLinear(dim, dim, bias=qkv_bias, **gblr)
        self.v_proj = GaudiGBLRLinear(dim, dim, bias=qkv_bias, **gblr)
        self.proj = nn.Linear(dim, dim, device=gblr.get("device"), dtype=gblr.get("dtype"))

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = (
            proj(x).view(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class GBLRVisionTransformer(VisionTransformer):
    """:class:`~effnn.models.vit.VisionTransformer` whose blocks have GBLR q/k/v projections
    (:class:`GBLRAttention`) and GBLR MLP linears, as the official GBLR ViT.

    Args:
        sigma: initial sigma of every GBLR layer (official 10.0, ``configs/model/vitmlp_cfg/
            gblr.yaml``; the recipe's :class:`effnn.train.gblr.SigmaSchedule` then anneals
            1 -> 100); None turns the Gaussian off (exact boxcars).
        width_init, location_init: of the GBLR layers (official 'splr' and 0.0).
        device, dtype: where to build it; ``device="meta"`` allocates nothing.
        **kwargs: :class:`~effnn.models.vit.VisionTransformer` arguments.
    """

    def __init__(
        self,
        *,
        sigma: float | None = 10.0,
        width_init: float | str = "splr",
        location_init: float | str = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs,
    ) -> None:
        # the dense layers that are replaced are never materialised
        super().__init__(device="meta", dtype=dtype, **kwargs)
        gblr = dict(rank_per_component=1, sigma=sigma, width_init=width_init,
                    location_init=location_init, device="meta", dtype=dtype)
        for block in self.blocks:
            dim = block.norm1.normalized_shape[0]
            qkv_bias = block.attn.qkv.bias is not None
            block.attn = GBLRAttention(dim, block.attn.num_heads, qkv_bias, **gblr)
            hidden = block.mlp.fc1.out_features
            block.mlp.fc1 = GaudiGBLRLinear(dim, hidden, **gblr)
            block.mlp.fc2 = GaudiGBLRLinear(hidden, dim, **gblr)
        target = torch.device(device) if device is not None else torch.get_default_device()
        if target.type != "meta":
            self.to_empty(device=target)
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Dense layers as :meth:`VisionTransformer.reset_parameters` (timm's init); GBLR layers as
        the official ``_init_vit_weights``: zero bias, factors from the SVD of a
        trunc_normal(std=0.02) dense draw (``set_weights_from_dense_init``), widths and locations
        from their init, ``sigma`` buffer from the constructor."""
        self._reset_timm_layers()
        for m in self.modules():
            if isinstance(m, GaudiGBLRLinear):
                m.freq_in.copy_(torch.arange(m.in_features // 2 + 1))
                m.freq_out.copy_(torch.arange(m.out_features // 2 + 1))
                m.sigma.fill_(m.sigma_init)
                if not m.lr_weight1.is_meta:
                    dense = torch.empty(m.out_features, m.in_features, device=m.lr_weight1.device,
                                        dtype=m.lr_weight1.dtype)
                    m.project_(nn.init.trunc_normal_(dense, std=0.02))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
                m.reset_structure()


def vit_base_patch16_224_gblr(
    sigma: float | None = 10.0,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **kwargs,
) -> GBLRVisionTransformer:
    """GBLR ViT-B/16 at 224x224 as the paper's ImageNet model (official ``vit-b-gaudi.yaml``).

    12 blocks, width 768, 12 heads, MLP 3072; per block q/k/v (768x768) and fc1 (768x3072), fc2
    (3072x768) are :class:`~effnn.GaudiGBLRLinear` with r = 1, K = 768, 'splr' widths (nominally
    the dense cost) at location 0; ``attn.proj`` dense. 122,141,416 parameters (a GBLR layer holds
    two full factors, as the official one; dense ViT-B/16: 86,567,656).

    Args:
        sigma: initial sigma (official 10.0); None: Gaussian off.
        device, dtype: where to build it; ``device="meta"`` allocates nothing (the 60 SVDs of the
            official init take about 25 s on one CPU thread).
        **kwargs: :class:`GBLRVisionTransformer` / :class:`VisionTransformer` overrides
            (``num_classes``, ``width_init``, ...).

    Example::

        >>> model = vit_base_patch16_224_gblr(device="meta")
        >>> sum(p.numel() for p in model.parameters())
        122141416
    """
    args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=True)
    args.update(kwargs)
    return GBLRVisionTransformer(sigma=sigma, device=device, dtype=dtype, **args)
