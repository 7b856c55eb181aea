"""nn.Modules: parameters, input validation and one op call each."""

from effnn.nn.adamixer import AdaMixerDecoderStage
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
from effnn.nn.radial_window import (
    CubicWindowAttention,
    RadialWindowAttention,
    SphereFormerAttention,
)
from effnn.nn.routing_attention import BiLevelRoutingAttention
from effnn.nn.sparse_conv import (
    SparseConv3d,
    SparseConvTensor,
    SparseInverseConv3d,
    SparseSequential,
    SubMConv3d,
)

__all__ = ["AdaMixerDecoderStage", "GaudiGBLRLinear", "GBLRStructuredLinear", "GammaRouter", "KVCache", "MoDBlock", "MoDPredictor", "MoDRouter", "PreNormBlock", "mod_aux_loss", "FeedForward", "MoE", "ContextBroadcast", "MonarchLinear", "BiLevelRoutingAttention", "CubicWindowAttention", "RadialWindowAttention", "SphereFormerAttention", "SparseAnchorGenerator", "SparseAnchors", "SparseConvTensor", "SparseSequential", "SubMConv3d", "SparseConv3d", "SparseInverseConv3d"]
