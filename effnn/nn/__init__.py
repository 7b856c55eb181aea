"""nn.Modules: parameters, input validation and one op call each."""

from effnn.nn.asag import SparseAnchorGenerator, SparseAnchors
from effnn.nn.broadcast import ContextBroadcast
from effnn.nn.gblr import GaudiGBLRLinear, GBLRStructuredLinear
from effnn.nn.mod import (
    GammaRouter,
    KVCache,
    MoDBlock,
    MoDPredictor,
    MoDRouter,
    PreNormBlock,
    mod_aux_loss,
)
from effnn.nn.moe import FeedForward, MoE
from effnn.nn.monarch import MonarchLinear
from effnn.nn.radial_window import RadialWindowAttention, SphereFormerAttention
from effnn.nn.routing_attention import BiLevelRoutingAttention

__all__ = ["GaudiGBLRLinear", "GBLRStructuredLinear", "GammaRouter", "KVCache", "MoDBlock", "MoDPredictor", "MoDRouter", "PreNormBlock", "mod_aux_loss", "FeedForward", "MoE", "ContextBroadcast", "MonarchLinear", "BiLevelRoutingAttention", "RadialWindowAttention", "SphereFormerAttention", "SparseAnchorGenerator", "SparseAnchors"]
