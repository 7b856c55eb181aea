"""Vision Transformer (Dosovitskiy et al., ICLR 2021) in plain PyTorch, and its Monarch version
(Dao et al., "Monarch", ICML 2022, Table 1).

Parameter names and shapes are timm's ``VisionTransformer`` (class-token pooling, no pre-logits),
so a timm checkpoint of ``vit_base_patch16_224`` loads with a plain ``load_state_dict``:
``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.N.{norm1, attn.qkv, attn.proj, norm2,
mlp.fc1, mlp.fc2}``, ``norm``, ``head``.

Monarch configurations (see docs/models.md for how they compare with the paper's table):

=========== ================================================= ===========================
preset      linears swapped for ``MonarchLinear(nblocks=4)``  ViT-B/16 params / GMACs
=========== ================================================= ===========================
None        none (dense)                                      86.57M / 17.56
"qkv_mlp"   attn.qkv, mlp.fc1, mlp.fc2 (default of True)      33.48M / 7.11
"all"       attn.qkv, attn.proj, mlp.fc1, mlp.fc2             29.94M / 6.41
"mlp"       mlp.fc1, mlp.fc2 (the official fly configs)       47.64M / 9.89
=========== ================================================= ===========================

GMACs: one 224x224 image, as ``FlopCounterMode`` / 2 (fvcore adds 0.02 G for the LayerNorms).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effnn.models._monarch import build_model, reset_other_modules

__all__ = ["VisionTransformer", "VIT_MONARCH_PRESETS", "vit_base_patch16_224"]

#: preset name -> module-name suffixes swapped for MonarchLinear
VIT_MONARCH_PRESETS: dict[str, tuple[str, ...]] = {
    "qkv_mlp": ("attn.qkv", "mlp.fc1", "mlp.fc2"),
    "all": ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"),
    "mlp": ("mlp.fc1", "mlp.fc2"),
}


class PatchEmbed(nn.Module):
    """Image (B, C, H, W) -> patch tokens (B, H/p * W/p, dim) with one strided convolution."""

    def __init__(
        self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, **factory
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(
                f"PatchEmbed: img_size={img_size} is not divisible by patch_size={patch_size}"
            )
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size, **factory)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"PatchEmbed: expected input (B, C, {self.img_size}, {self.img_size}), got {tuple(x.shape)}"
            )
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, **factory) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **factory)
        self.proj = nn.Linear(dim, dim, **factory)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = (
            self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        )
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, **factory) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, **factory)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, **factory)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, **factory
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, **factory)
        self.attn = Attention(dim, num_heads, qkv_bias, **factory)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, **factory)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), **factory)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT with a class token, learned position embeddings and a linear head on the class token.

    Args: as timm's ``VisionTransformer`` (a subset); ``device``/``dtype`` as for ``nn.Linear``
    (``device="meta"`` builds it without allocating memory).

    Shape: (B, in_chans, img_size, img_size) -> (B, num_classes).
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, **factory)
        self.cls_token = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
        self.pos_embed = nn.Parameter(
            torch.empty(1, self.patch_embed.num_patches + 1, embed_dim, **factory)
        )
        self.blocks = nn.Sequential(
            *[Block(embed_dim, num_heads, mlp_ratio, qkv_bias, **factory) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6, **factory)
        self.head = nn.Linear(embed_dim, num_classes, **factory)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """timm's default init: truncated normal(0.02) for linears and position embeddings, zero
        biases, cls token N(0, 1e-6); other layers (e.g. the ``MonarchLinear`` put in by
        ``swap_linear``) use their own ``reset_parameters``."""
        self._reset_timm_layers()
        reset_other_modules(self, (nn.Linear, nn.LayerNorm, nn.Conv2d))

    def _reset_timm_layers(self) -> None:
        """timm's init of the position embedding, class token, linears, norms and convs."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.Conv2d)):
                m.reset_parameters()

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.norm(self.blocks(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x)[:, 0])


def vit_base_patch16_224(
    monarch: str | Sequence[str] | bool | None = None,
    nblocks: int = 4,
    *,
    init: str = "random",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **kwargs,
) -> VisionTransformer:
    """ViT-B/16 at 224x224 (86.6M parameters, 17.6 GMACs), optionally with Monarch linears.

    Args:
        monarch: None (dense), True (= "qkv_mlp", the configuration closest to the Monarch
            paper's Table 1), a preset of :data:`VIT_MONARCH_PRESETS`, or a list of module names
            / suffixes for ``effnn.swap_linear(target_modules=...)``.
        nblocks: blocks per Monarch factor (the paper uses 4).
        init: "random" (train from scratch, as the paper) or "project" (best Monarch
            approximation of the freshly initialised dense weights).
        device, dtype: where to build it; ``device="meta"`` allocates nothing.
        **kwargs: overrides of :class:`VisionTransformer` arguments (e.g. ``num_classes``).

    Example::

        >>> model = vit_base_patch16_224(monarch=True, device="meta")
        >>> sum(p.numel() for p in model.parameters())
        33483496
    """
    args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=True)
    args.update(kwargs)
    return build_model(
        lambda dev: VisionTransformer(device=dev, dtype=dtype, **args),
        monarch,
        VIT_MONARCH_PRESETS,
        "qkv_mlp",
        nblocks,
        init,
        device,
        "vit_base_patch16_224",
    )
