"""effnn: efficient layers from recent papers, exact to the paper, as drop-in PyTorch modules.

Importing effnn is cheap and safe: it never initialises CUDA, never compiles, and needs neither
triton nor the compiled extension (``python -m effnn.info`` reports what is available).
"""

from effnn.checkpoint import load, save
from effnn.convert import MonarchConfig, insert_cb, remove_cb, swap_linear
from effnn.convert.linear import GBLRConfig
from effnn.convert.mod import arank, select_mod_layers, to_mod
from effnn.convert.ones import distillation_loss, gather_all_experts, gather_experts
from effnn.nn import ContextBroadcast, MonarchLinear
from effnn.nn.asag import SparseAnchorGenerator, SparseAnchors, anchor_generator_loss, query_weights
from effnn.nn.gblr import GaudiGBLRLinear, GBLRStructuredLinear
from effnn.nn.mod import GammaRouter, MoDBlock, MoDRouter, mod_aux_loss
from effnn.nn.moe import FeedForward, MoE
from effnn.nn.radial_window import (
    CubicWindowAttention,
    RadialWindowAttention,
    SphereFormerAttention,
)
from effnn.nn.routing_attention import BiLevelRoutingAttention
from effnn.ops._dispatch import BackendError

__version__ = "0.1.0"

__all__ = [
    "GaudiGBLRLinear", "GBLRStructuredLinear", "GBLRConfig",
    "SparseAnchorGenerator", "SparseAnchors", "anchor_generator_loss", "query_weights",
    "CubicWindowAttention", "RadialWindowAttention", "SphereFormerAttention",
    "BiLevelRoutingAttention",
    "GammaRouter",
    "MoDBlock",
    "MoDRouter",
    "arank",
    "mod_aux_loss",
    "select_mod_layers",
    "to_mod",
    "BackendError",
    "FeedForward",
    "MoE",
    "distillation_loss",
    "gather_all_experts",
    "gather_experts",
    "ContextBroadcast",
    "MonarchConfig",
    "MonarchLinear",
    "insert_cb",
    "load",
    "remove_cb",
    "save",
    "swap_linear",
]
