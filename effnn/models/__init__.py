"""Reference models assembled from ``torch.nn`` and ``effnn`` layers.

- :func:`vit_base_patch16_224`: ViT-B/16 (timm parameter names), dense or Monarch (Monarch
  paper, Table 1).
- :func:`gpt2_small`, :func:`gpt2_medium`: GPT-2 (Hugging Face module names, ``nn.Linear``
  projections), dense or Monarch (Monarch paper, Table 2).
- :func:`biformer_tiny`, :func:`biformer_small`, :func:`biformer_base`: BiFormer (official
  parameter names), classifiers or multi-scale backbones (``features_only=True``).
- :func:`vit_base_patch16_224_gblr`: GBLR ViT-B/16 (Lee & Kim, ICLR 2024; official module layout).
- :func:`sphereformer_unet`: SphereFormer's LiDAR segmentation U-Net (Lai et al., CVPR 2023;
  official layout, 32,311,715 parameters for SemanticKITTI) and :func:`voxelize`.
- :func:`asag_detector`: the one-decoder-layer ASAG detector (Fu et al., ICCV 2023; ASAG-A).

The Monarch configurations and how they compare with the paper's tables are in docs/models.md.
"""

from effnn.models.asag import ASAGDetector, asag_detector
from effnn.models.biformer import BiFormer, biformer_base, biformer_small, biformer_tiny
from effnn.models.gblr_vit import GBLRVisionTransformer, vit_base_patch16_224_gblr
from effnn.models.gpt2 import (
    GPT2_MONARCH_PRESETS,
    GPT2LMHeadModel,
    convert_hf_gpt2_state_dict,
    gpt2_medium,
    gpt2_small,
)
from effnn.models.sphereformer import SphereFormerUNet, sphereformer_unet, voxelize
from effnn.models.vit import VIT_MONARCH_PRESETS, VisionTransformer, vit_base_patch16_224

__all__ = [
    "ASAGDetector",
    "asag_detector",
    "BiFormer",
    "GBLRVisionTransformer",
    "GPT2LMHeadModel",
    "GPT2_MONARCH_PRESETS",
    "SphereFormerUNet",
    "VIT_MONARCH_PRESETS",
    "VisionTransformer",
    "biformer_base",
    "biformer_small",
    "biformer_tiny",
    "convert_hf_gpt2_state_dict",
    "gpt2_medium",
    "gpt2_small",
    "sphereformer_unet",
    "vit_base_patch16_224",
    "vit_base_patch16_224_gblr",
    "voxelize",
]
