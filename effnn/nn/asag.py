"""``SparseAnchorGenerator``: Adaptive Sparse Anchor Generation (ASAG) as a drop-in module."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effnn.ops.asag import (
    PatchPredictions,
    anchor_generator_loss,
    box_cxcywh_to_xyxy,
    box_iou,
    crop_pos_from_centers,
    nms,
    padded_targets,
    query_weights,
    resize_valid_bilinear,
)

# the loss and Query Weighting are pure functions (effnn.ops.asag), re-exported with the module
__all__ = ["SparseAnchorGenerator", "SparseAnchors", "anchor_generator_loss", "query_weights"]

_INTERP = 30  # the fixed stage resizes P5 to 30x30: four 15x15 quadrants, and P6 at 15x15
_FIXED = 15
_LEVELS = {"P5P6": 1, "P4P6": 2, "P3P6": 3}  # how many stages run (official numbering)
_MIN_TRAINING_PATCHES = 4  # the official ``minial_training_patch`` (N_TP of the paper)
_BIG = 1 << 40  # key stride between stages when ordering the emitted anchors


class SparseAnchors(NamedTuple):
    """Output of :class:`SparseAnchorGenerator`.

    boxes (B, N, 4): (cx, cy, w, h) in pixels of each image's valid region; padding entries are
    the whole image, as in the official code. scores (B, N): confidences (0 on padding).
    valid (B, N): real anchors. levels (B, N): where each came from, 6 (the whole-image P6
    patch), 5 (a P5 quadrant), 4 or 3 (a probing patch on P4 / P3), -1 padding.
    patches: the raw predictions of every patch, for :func:`effnn.ops.asag.anchor_generator_loss`
    (and to see which patches were probed)."""

    boxes: Tensor
    scores: Tensor
    valid: Tensor
    levels: Tensor
    patches: list[PatchPredictions]


def _activation(name: str) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    if name == "gelu":
        return nn.GELU()
    if name == "silu":
        return nn.SiLU()
    raise ValueError(f"SparseAnchorGenerator: activation must be 'relu', 'gelu' or 'silu', got {name!r}")


class _MLP(nn.Module):
    """The official ``MLP`` (parameter names ``layers.{i}.*``)."""

    def __init__(self, dims: Sequence[int], activation: str, **factory) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b, **factory) for a, b in zip(dims[:-1], dims[1:], strict=True))
        self.act = _activation(activation)

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = self.act(x)
        return x


class SparseAnchorGenerator(nn.Module):
    r"""Adaptive Sparse Anchor Generation (Fu et al., "Building Strong One-Decoder-Layer Sparse
    Detectors via Adaptive Sparse Anchor Generation", ICCV 2023): image-specific anchors predicted
    from a few large patches instead of a dense grid, probing finer levels only where needed.

    Fixed stage: P5 is compressed to ``compress_dim`` channels, its valid region resized to 30x30;
    its four 15x15 quadrants and one whole-image P6 patch (a strided conv of the 30x30 map) are
    each layer-normalised as a whole, given a learned position table, flattened, and an MLP
    (``proj_all``) predicts ``num_pred_anchor1`` anchors (box + confidence) per patch.
    Adaptive probing, top-down on P4 then P3: anchors with ``threshold2`` < confidence <
    ``threshold1`` and both sides under half a patch (stride * patch_size / 2) are *selected*;
    a patch_size x patch_size patch is centred on each, overlapping patches are pruned by NMS
    (IoU ``nms_threshold``), and ``proj_patch`` predicts ``num_pred_anchor2`` anchors per patch,
    which replace the selected ones. Probing stops when no anchor is selected or at
    ``used_inference_level`` ("P5P6", "P4P6", "P3P6"). Anchors with confidence >
    ``use_anchor_threshold`` are emitted (at least ``min_anchor`` from the fixed stage, at most
    ``max_anchor`` per image, the highest-scoring).

    In training (``targets`` given), probing never stops early, the P6 patch is also predicted
    flipped (for the loss), and every probed level gets at least 4 patches per image: patches
    around small ground-truth boxes, then random ones (these train the generator but emit
    nothing); before ``use_target_epoch`` only ground-truth patches are probed, and emitted.

    Parameters are named as in the official ``AnchorGenerator`` (iSEE-Laboratory/ASAG,
    models/anchor_generator.py), so its weights load with ``load_state_dict``: ``compress.{0,1,2}``
    (P3, P4, P5: 1x1 conv d_model -> d_model/2, activation, 3x3 conv -> compress_dim), ``P6``,
    ``layernorm.{0,1,2}`` and ``pos_embedding.{0,1,2}`` (fixed stage, P4, P3), ``proj_all`` and
    ``proj_patch`` (3-layer MLPs, hidden 125 * compress_dim). The released models use
    ``activation="gelu"`` (the training script's default), the default here.

    Differences from the official code (see docs/asag.md): each image reads only its valid region
    of every map (the official convs also read the batch padding at the border), so an image gives
    the same anchors alone or in any padded batch; maps smaller than a patch are zero-padded (the
    official code crashes below 240 px); cropping is batched; P4/P3 are compressed only under the
    probed patches when that is cheaper.

    Args:
        d_model: channels of the input maps. num_pred_anchor1, num_pred_anchor2: anchors per
            fixed-stage and per probing patch. patch_size: cells per side of a probing patch.
        compress_dim: channels after compression. stride: strides of the three input maps, finest
            first. threshold1, threshold2, nms_threshold, use_anchor_threshold, used_inference_level:
            as above. activation: "relu", "gelu" or "silu". use_target_epoch: epochs of
            ground-truth-only probing. min_anchor, max_anchor: default 5 / 200, or 50 / 500 when
            num_pred_anchor1 != 50 (the official rule). max_patches_per_level: keep at most this many
            probing patches per image and level (the highest-scoring; None = no cap, as the official
            ``forward``; its ``fast_inference`` used 15, its CrowdHuman setting 60).
        static_shapes: inference with static shapes for ``torch.compile(fullgraph=True)`` and
            ``torch.export``: ``max_patches_per_level`` masked patch slots per image and level, no
            early stop, ``max_anchor`` output slots; the same anchors as the dynamic path with that
            cap. Training always uses the dynamic path.

    Shapes: ``features`` = [P3, P4, P5], each (B, d_model, H_l, W_l); ``image_sizes`` (B, 2) valid
    (h, w) in pixels (default: the whole map); ``targets`` in training: per image (G, 4) boxes,
    normalised (cx, cy, w, h) of the valid image (or dicts with "boxes"). Returns
    :class:`SparseAnchors`.

    Example::

        >>> gen = SparseAnchorGenerator().eval()
        >>> feats = [torch.randn(2, 256, 100 // s, 128 // s) for s in (1, 2, 4)]  # strides 8, 16, 32
        >>> out = gen(feats, torch.tensor([[800, 1024], [640, 960]]))
        >>> out.boxes.shape[0], out.boxes.shape[2]
        (2, 4)
        >>> # training: out = gen.train()(feats, sizes, targets, epoch=e)
        >>> # loss = effnn.ops.asag.anchor_generator_loss(out.patches, targets, sizes)["loss_anchor"]
    """

    def __init__(
        self,
        d_model: int = 256,
        num_pred_anchor1: int = 50,
        num_pred_anchor2: int = 20,
        patch_size: int = 15,
        compress_dim: int = 8,
        stride: Sequence[int] = (8, 16, 32),
        threshold1: float = 0.7,
        threshold2: float = 0.1,
        nms_threshold: float = 0.25,
        use_anchor_threshold: float = 0.1,
        used_inference_level: str = "P3P6",
        activation: str = "gelu",
        use_target_epoch: int = 1,
        min_anchor: int | None = None,
        max_anchor: int | None = None,
        max_patches_per_level: int | None = None,
        static_shapes: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("d_model", d_model), ("num_pred_anchor1", num_pred_anchor1),
            ("num_pred_anchor2", num_pred_anchor2), ("patch_size", patch_size),
            ("compress_dim", compress_dim),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SparseAnchorGenerator: {name} must be a positive int, got {value!r}")
        if d_model < 2:
            raise ValueError(f"SparseAnchorGenerator: d_model must be >= 2, got {d_model}")
        stride = tuple(stride)
        if len(stride) != 3 or not all(isinstance(s, int) and s > 0 for s in stride) or not (
            stride[0] < stride[1] < stride[2]
        ):
            raise ValueError(
                f"SparseAnchorGenerator: stride must be 3 increasing positive ints (P3, P4, P5), got {stride}"
            )
        if used_inference_level not in _LEVELS:
            raise ValueError(
                f"SparseAnchorGenerator: used_inference_level must be one of {tuple(_LEVELS)}, "
                f"got {used_inference_level!r}"
            )
        for name, value in (("threshold1", threshold1), ("threshold2", threshold2),
                            ("nms_threshold", nms_threshold), ("use_anchor_threshold", use_anchor_threshold)):
            if not 0 <= value <= 1:
                raise ValueError(f"SparseAnchorGenerator: {name} must be in [0, 1], got {value}")
        default_min, default_max = (5, 200) if num_pred_anchor1 == 50 else (50, 500)
        self.min_anchor = default_min if min_anchor is None else min_anchor
        self.max_anchor = default_max if max_anchor is None else max_anchor
        if not 0 <= self.min_anchor <= self.max_anchor:
            raise ValueError(
                f"SparseAnchorGenerator: need 0 <= min_anchor <= max_anchor, got {self.min_anchor}, {self.max_anchor}"
            )
        if max_patches_per_level is not None and max_patches_per_level < 1:
            raise ValueError(
                f"SparseAnchorGenerator: max_patches_per_level must be None or >= 1, got {max_patches_per_level}"
            )
        self.d_model = d_model
        self.num_pred_anchor1 = num_pred_anchor1
        self.num_pred_anchor2 = num_pred_anchor2
        self.patch_size = patch_size
        self.compress_dim = compress_dim
        self.stride = stride
        self.threshold1 = threshold1
        self.threshold2 = threshold2
        self.nms_threshold = nms_threshold
        self.use_anchor_threshold = use_anchor_threshold
        self.used_inference_level = used_inference_level
        self.activation = activation
        self.use_target_epoch = use_target_epoch
        self.max_patches_per_level = max_patches_per_level
        if static_shapes and max_patches_per_level is None:
            raise ValueError("SparseAnchorGenerator: static_shapes=True needs max_patches_per_level (patch slots per image and level)")
        self.static_shapes = static_shapes
        factory = {"device": device, "dtype": dtype}
        hidden = 125 * compress_dim
        self.compress = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(d_model, d_model // 2, 1, **factory),
                _activation(activation),
                nn.Conv2d(d_model // 2, compress_dim, 3, padding=1, **factory),
            )
            for _ in stride
        )
        self.P6 = nn.Conv2d(compress_dim, compress_dim, 3, stride=2, padding=2, dilation=2, **factory)
        tokens = [_FIXED * _FIXED] + [patch_size * patch_size] * 2
        self.layernorm = nn.ModuleList(nn.LayerNorm((t, compress_dim), **factory) for t in tokens)
        self.pos_embedding = nn.ModuleList(nn.Embedding(t, compress_dim, **factory) for t in tokens)
        self.proj_all = _MLP((tokens[0] * compress_dim, hidden, hidden, 5 * num_pred_anchor1), activation, **factory)
        self.proj_patch = _MLP((tokens[1] * compress_dim, hidden, hidden, 5 * num_pred_anchor2), activation, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official initialisation: the layers' defaults, then Xavier-uniform for every
        parameter of 2 or more dims (the LayerNorm affine tables included), zero position tables."""
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()
        with torch.no_grad():
            for p in self.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
            for emb in self.pos_embedding:
                nn.init.zeros_(emb.weight)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_pred_anchor1={self.num_pred_anchor1}, "
            f"num_pred_anchor2={self.num_pred_anchor2}, patch_size={self.patch_size}, "
            f"compress_dim={self.compress_dim}, stride={self.stride}, threshold1={self.threshold1}, "
            f"threshold2={self.threshold2}, nms_threshold={self.nms_threshold}, "
            f"use_anchor_threshold={self.use_anchor_threshold}, "
            f"used_inference_level={self.used_inference_level!r}, anchors=[{self.min_anchor}, {self.max_anchor}]"
        )

    # ---- pieces -------------------------------------------------------------------------------

    def _tokens(self, patches: Tensor, idx: int) -> Tensor:
        """(..., compress_dim, n, n) patches -> (..., n*n*compress_dim) MLP inputs: layer norm
        over the whole patch, plus the position table, flattened token-major."""
        t = patches.flatten(-2).transpose(-1, -2)
        ln = self.layernorm[idx]
        t = F.layer_norm(t, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
        return (t + self.pos_embedding[idx].weight).flatten(-2)

    def _compress_dense(self, level: int, x: Tensor, valid_hw: Tensor) -> Tensor:
        """Compress a whole map; cells outside each image's valid region are zero, before the 3x3
        conv (as its zero padding) and after it."""
        conv1, act, conv2 = self.compress[level]
        inside = _inside(x, valid_hw)
        zero = x.new_zeros(())
        return torch.where(inside, conv2(torch.where(inside, act(conv1(x)), zero)), zero)

    def _crop(self, c: Tensor, valid_hw: Tensor, img: Tensor, crop_pos: Tensor) -> Tensor:
        """patch_size x patch_size windows of a compressed map at (x, y) cells; zero outside."""
        ar = torch.arange(self.patch_size, device=c.device)
        rows, cols = crop_pos[:, 1:] + ar, crop_pos[:, :1] + ar
        vr, vc = rows < valid_hw[img, :1], cols < valid_hw[img, 1:]
        H, W = c.shape[-2:]
        win = c[img[:, None, None], :, rows.clamp(max=H - 1)[:, :, None], cols.clamp(max=W - 1)[:, None, :]]
        return torch.where((vr[:, :, None] & vc[:, None, :])[..., None], win, win.new_zeros(())).permute(0, 3, 1, 2)

    def _compress_windows(self, level: int, x: Tensor, valid_hw: Tensor, img: Tensor, crop_pos: Tensor) -> Tensor:
        """Compress only the probed patches: gather each (patch_size + 2)^2 input window, apply the
        1x1 conv and activation, zero cells outside the valid region, then the 3x3 conv without
        padding. Equals cropping :meth:`_compress_dense` (tested)."""
        conv1, act, conv2 = self.compress[level]
        ar = torch.arange(self.patch_size + 2, device=x.device) - 1
        rows, cols = crop_pos[:, 1:] + ar, crop_pos[:, :1] + ar
        vr = (rows >= 0) & (rows < valid_hw[img, :1])
        vc = (cols >= 0) & (cols < valid_hw[img, 1:])
        H, W = x.shape[-2:]
        win = x[img[:, None, None], :, rows.clamp(0, H - 1)[:, :, None], cols.clamp(0, W - 1)[:, None, :]]
        h = act(F.linear(win, conv1.weight.flatten(1), conv1.bias))
        h = torch.where((vr[:, :, None] & vc[:, None, :])[..., None], h, h.new_zeros(())).permute(0, 3, 1, 2)
        out = F.conv2d(h, conv2.weight, conv2.bias)
        inner = vr[:, 1:-1, None] & vc[:, None, 1:-1]
        return torch.where(inner[:, None], out, out.new_zeros(()))

    def _probe_features(self, level: int, x: Tensor, valid_hw: Tensor, img: Tensor, crop_pos: Tensor) -> Tensor:
        if len(img) * (self.patch_size + 2) ** 2 < x.shape[0] * x.shape[2] * x.shape[3]:
            return self._compress_windows(level, x, valid_hw, img, crop_pos)
        return self._crop(self._compress_dense(level, x, valid_hw), valid_hw, img, crop_pos)

    # ---- forward ------------------------------------------------------------------------------

    def _check(self, features, image_sizes, targets) -> tuple[list[Tensor], Tensor]:
        if not isinstance(features, (list, tuple)) or len(features) != 3:
            raise ValueError(
                "SparseAnchorGenerator: features must be a list of 3 maps [P3, P4, P5], got "
                f"{type(features).__name__} of length {len(features) if isinstance(features, (list, tuple)) else '-'}"
            )
        ref = features[0]
        for name, f in zip(("P3", "P4", "P5"), features, strict=True):
            if not isinstance(f, Tensor):
                raise TypeError(f"SparseAnchorGenerator: features[{name}] must be a Tensor, got {type(f).__name__}")
            if f.dim() != 4 or f.shape[1] != self.d_model:
                raise ValueError(
                    f"SparseAnchorGenerator: features[{name}] must be (B, {self.d_model}, H, W), got {tuple(f.shape)}"
                )
            if not f.is_floating_point():
                raise TypeError(f"SparseAnchorGenerator: features[{name}] must be floating point, got {f.dtype}")
            if f.shape[0] != ref.shape[0]:
                raise ValueError(
                    f"SparseAnchorGenerator: features have batch sizes {[t.shape[0] for t in features]}; they must agree"
                )
            if f.device != ref.device:
                raise ValueError(f"SparseAnchorGenerator: features[{name}] is on {f.device}, features[P3] on {ref.device}")
            if min(f.shape[2:]) < 1:
                raise ValueError(f"SparseAnchorGenerator: features[{name}] has an empty map {tuple(f.shape)}")
        B = ref.shape[0]
        if B == 0:
            raise ValueError("SparseAnchorGenerator: empty batch (B = 0)")
        extent = [(f.shape[2] * s, f.shape[3] * s) for f, s in zip(features, self.stride, strict=True)]
        if image_sizes is None:
            image_sizes = torch.tensor(extent[0], device=ref.device).expand(B, 2)
        if not isinstance(image_sizes, Tensor) or tuple(image_sizes.shape) != (B, 2):
            raise ValueError(
                f"SparseAnchorGenerator: image_sizes must be a (B={B}, 2) tensor of valid (h, w), got "
                f"{tuple(image_sizes.shape) if isinstance(image_sizes, Tensor) else type(image_sizes).__name__}"
            )
        sizes = image_sizes.to(device=ref.device, dtype=torch.float64)
        if not torch.compiler.is_compiling():  # value checks: data-dependent, skipped when traced
            if not torch.isfinite(sizes).all() or (sizes < 1).any():
                raise ValueError(f"SparseAnchorGenerator: image_sizes must be finite and >= 1, got {image_sizes.tolist()}")
            for name, (eh, ew), s in zip(("P3", "P4", "P5"), extent, self.stride, strict=True):
                over = (torch.ceil(sizes / s) > torch.tensor([eh // s, ew // s], device=sizes.device)).any(1)
                if over.any():
                    raise ValueError(
                        f"SparseAnchorGenerator: image_sizes {sizes[over].tolist()} exceed the {name} map "
                        f"({eh // s}x{ew // s} cells at stride {s}, i.e. {eh}x{ew} px)"
                    )
        if self.training:
            if targets is None or len(targets) != B:
                raise ValueError(
                    f"SparseAnchorGenerator: training needs targets, one (G, 4) tensor per image (B={B}), got "
                    f"{None if targets is None else len(targets)}"
                )
            for b, t in enumerate(targets):
                t = t["boxes"] if isinstance(t, dict) else t
                if not isinstance(t, Tensor) or t.dim() != 2 or t.shape[1] != 4:
                    raise ValueError(
                        f"SparseAnchorGenerator: targets[{b}] must be a (G, 4) tensor of normalised (cx, cy, w, h), got "
                        f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}"
                    )
        return list(features), sizes

    def forward(
        self,
        features: Sequence[Tensor],
        image_sizes: Tensor | None = None,
        targets: Sequence[Tensor] | None = None,
        epoch: int | None = None,
    ) -> SparseAnchors:
        """Anchors for ``features`` = [P3, P4, P5] of images with valid ``image_sizes`` (B, 2)
        (h, w) px. In training, ``targets`` are required and ``epoch`` < ``use_target_epoch``
        selects ground-truth-only probing (None: past it; the official default, -1, meant
        ground-truth-only)."""
        features, sizes = self._check(features, image_sizes, targets)
        dtype = self.P6.weight.dtype
        # the official model runs the generator in float32 outside autocast
        with torch.autocast(features[0].device.type, enabled=False):
            x = [f.to(dtype) for f in features]
            box_targets = None
            if self.training:
                box_targets = [t["boxes"] if isinstance(t, dict) else t for t in targets]
            if self.static_shapes and not self.training:
                return self._forward_static(x, sizes.to(torch.promote_types(dtype, torch.float32)))
            generated = not self.training or epoch is None or epoch >= self.use_target_epoch
            return self._forward(x, sizes.to(torch.promote_types(dtype, torch.float32)), box_targets, generated)

    def _prepare(self, x: list[Tensor], sizes: Tensor):
        """Valid (w, h), (w, h, w, h) and per-level valid cells; rejects non-finite features."""
        dev, dtype = x[0].device, x[0].dtype
        wh = sizes.flip(-1)  # (B, 2) valid (w, h) in pixels
        valid = [
            torch.minimum(torch.ceil(sizes / s), torch.tensor(f.shape[2:], device=dev, dtype=dtype)).clamp(min=1).long()
            for f, s in zip(x, self.stride, strict=True)
        ]
        if not torch.compiler.is_compiling():
            for name, f, v in zip(("P3", "P4", "P5"), x, valid, strict=True):
                # a NaN or inf in any channel makes the channel sum non-finite: one read of the
                # map and a (B, 1, H, W) result, not a masked copy of it (15x cheaper at P3);
                # float32 so that large fp16 features do not overflow the sum
                channel_sum = f.sum(1, keepdim=True, dtype=torch.float32)
                if not torch.where(_inside(f, v), channel_sum, 0).isfinite().all():
                    raise ValueError(f"SparseAnchorGenerator: features[{name}] has NaN or inf inside the valid image region")
        return wh, wh.repeat(1, 2), valid

    def _fixed_stage(self, x, sizes, valid, whwh):
        """P5 resized to 30x30, its four quadrants and the whole-image P6 patch (plus P6's flips in
        training): the loss records of levels 6 and 5, and the (B, 5 K1) anchors in pixels."""
        B, dev, dtype = x[0].shape[0], x[0].device, x[0].dtype
        K1 = self.num_pred_anchor1
        arange_b = torch.arange(B, device=dev)
        patches_out: list[PatchPredictions] = []
        c5 = self._compress_dense(2, x[2], valid[2])
        hw5 = torch.minimum(torch.round(sizes / self.stride[2]), torch.tensor(c5.shape[2:], device=dev, dtype=dtype))
        interp = resize_valid_bilinear(c5, hw5.clamp(min=1).long(), _INTERP)
        p6 = self.P6(F.relu(interp))
        cd = self.compress_dim
        quads = interp.view(B, cd, 2, _FIXED, 2, _FIXED).permute(0, 2, 4, 1, 3, 5).reshape(B, 4, cd, _FIXED, _FIXED)
        p6s = [p6]
        if self.training:  # flipped copies (W, H, both) train the P6 head; only p6 is emitted
            p6s += [p6.flip(-1), p6.flip(-2), p6.flip(-2, -1)]
        fixed = torch.cat([quads, torch.stack(p6s, 1)], 1)
        raw = self.proj_all(self._tokens(fixed, 0)).view(B, fixed.shape[1], K1, 5)
        pred = torch.cat([torch.sigmoid(raw[..., :4]), raw[..., 4:]], -1)
        n6 = len(p6s)
        quad_xy = torch.tensor([[0, 0], [_FIXED, 0], [0, _FIXED], [_FIXED, _FIXED]], device=dev)  # (x, y)
        patches_out.append(PatchPredictions(
            6, pred[:, 4:].flatten(0, 1), arange_b.repeat_interleave(n6),
            torch.zeros(B * n6, 2, dtype=torch.long, device=dev), torch.arange(n6, device=dev).repeat(B),
            torch.ones(B * n6, dtype=torch.bool, device=dev), self.stride[2], _FIXED,
        ))
        patches_out.append(PatchPredictions(
            5, pred[:, :4].flatten(0, 1), arange_b.repeat_interleave(4), quad_xy.repeat(B, 1),
            torch.zeros(B * 4, dtype=torch.long, device=dev), torch.ones(B * 4, dtype=torch.bool, device=dev),
            self.stride[2], _FIXED,
        ))
        a = pred[:, :5].detach()
        half = _FIXED / _INTERP
        offset = torch.cat([quad_xy.to(dtype) / _INTERP, torch.zeros(1, 2, device=dev, dtype=dtype)])  # (5, 2)
        scale = torch.tensor([half] * 4 + [1.0], device=dev, dtype=dtype)[:, None, None]
        boxes = a[..., :4] * scale
        boxes = torch.cat([boxes[..., :2] + offset[:, None, :], boxes[..., 2:]], -1).flatten(1, 2)
        boxes = boxes * whwh[:, None, :]
        conf = torch.sigmoid(a[..., 4]).flatten(1).to(boxes.dtype)  # >= float32, as the boxes
        conf = conf.masked_fill((boxes[..., 2] < 3) | (boxes[..., 3] < 3), 0)
        return patches_out, boxes, conf

    def _forward(self, x: list[Tensor], sizes: Tensor, targets, generated: bool) -> SparseAnchors:
        B, dev = x[0].shape[0], x[0].device
        K1, K2, ps = self.num_pred_anchor1, self.num_pred_anchor2, self.patch_size
        wh, whwh, valid = self._prepare(x, sizes)
        patches_out, boxes, conf = self._fixed_stage(x, sizes, valid, whwh)
        arange_b = torch.arange(B, device=dev)
        fixed_levels = torch.tensor([5, 5, 5, 5, 6], device=dev).repeat_interleave(K1)
        cur = (boxes, conf, arange_b)  # current stage: (G, K, 4) boxes, (G, K) conf, (G,) image
        cur_level = None  # None: the fixed stage; else 4 / 3
        emitted: list[tuple[Tensor, ...]] = []

        # ---- adaptive probing, top-down: P4 (i = 1), then P3 (i = 2) ----
        for i in (1, 2):
            if _LEVELS[self.used_inference_level] == i:
                break
            lvl = 2 - i
            s = self.stride[lvl]
            boxes, conf, img = cur
            limit = s * ps / 2
            sel = (conf < self.threshold1) & (conf > self.threshold2) & (boxes[..., 3] < limit) & (boxes[..., 2] < limit)
            if not self.training and not sel.any():
                break  # early stop; per image this equals running on with no patch
            if generated:
                g, k = torch.nonzero(sel, as_tuple=True)
                side = torch.full_like(boxes[g, k, :2], s * ps)
                pb = box_cxcywh_to_xyxy(torch.cat([boxes[g, k, :2], side], -1))
                keep = nms(pb, conf[g, k], self.nms_threshold, img[g])
                if self.max_patches_per_level is not None:
                    keep = keep[_rank_within(img[g][keep], B) < self.max_patches_per_level]
                p_img = img[g][keep]
                centers = (pb[keep, :2] + pb[keep, 2:]) / 2  # the official arithmetic, bit for bit
                crop = crop_pos_from_centers(centers, wh[p_img], s, ps)
                out_mask = (conf > self.use_anchor_threshold) & ~sel
            else:
                p_img = torch.zeros(0, dtype=torch.long, device=dev)
                crop = torch.zeros(0, 2, dtype=torch.long, device=dev)
                out_mask = conf > self.use_anchor_threshold
            emitted.append(self._emit(cur, out_mask, cur_level, len(emitted), fixed_levels))
            p_emit = torch.ones(len(p_img), dtype=torch.bool, device=dev)
            if self.training:
                crop, p_img, p_emit = self._training_patches(crop, p_img, targets, wh, s, generated)
            feats = self._probe_features(lvl, x[lvl], valid[lvl], p_img, crop)
            raw = self.proj_patch(self._tokens(feats, i)).view(-1, K2, 5)
            pred = torch.cat([torch.sigmoid(raw[..., :4]), raw[..., 4:]], -1)
            patches_out.append(PatchPredictions(
                4 if i == 1 else 3, pred, p_img, crop, torch.zeros_like(p_img), p_emit, s, ps,
            ))
            p_img, crop = p_img[p_emit], crop[p_emit]
            boxes, conf = self._to_image(pred[p_emit].detach(), p_img, crop, wh, s)
            cur = (boxes, conf, p_img)
            cur_level = 4 if i == 1 else 3
        emitted.append(self._emit(cur, cur[1] > self.use_anchor_threshold, cur_level, len(emitted), fixed_levels))
        return self._assemble(emitted, B, wh, patches_out)

    def _forward_static(self, x: list[Tensor], sizes: Tensor) -> SparseAnchors:
        """Inference with static shapes: every level is probed with exactly
        ``max_patches_per_level`` patch slots per image (masked when fewer are selected), no early
        stop (a level with nothing selected gets no real patch: the same anchors), and the output
        has ``max_anchor`` slots. Equals the dynamic path with the same cap (tested)."""
        B, dev = x[0].shape[0], x[0].device
        K1, K2, ps, k = self.num_pred_anchor1, self.num_pred_anchor2, self.patch_size, self.max_patches_per_level
        wh, whwh, valid = self._prepare(x, sizes)
        patches_out, boxes, conf = self._fixed_stage(x, sizes, valid, whwh)
        fixed_levels = torch.tensor([5, 5, 5, 5, 6], device=dev).repeat_interleave(K1)
        real = torch.ones_like(conf, dtype=torch.bool)  # anchors of real (not masked) patches
        level, rows = None, []
        p_img = torch.arange(B, device=dev).repeat_interleave(k)
        for i in (1, 2):
            if _LEVELS[self.used_inference_level] == i:
                break
            lvl = 2 - i
            s = self.stride[lvl]
            limit = s * ps / 2
            sel = real & (conf < self.threshold1) & (conf > self.threshold2) & (boxes[..., 3] < limit) & (boxes[..., 2] < limit)
            pb = box_cxcywh_to_xyxy(torch.cat([boxes[..., :2], torch.full_like(boxes[..., :2], s * ps)], -1))
            idx, p_valid = _nms_topk(pb, torch.where(sel, conf, -torch.inf), self.nms_threshold, k)
            pbk = pb.gather(1, idx[..., None].expand(B, k, 4)).flatten(0, 1)
            crop = crop_pos_from_centers((pbk[:, :2] + pbk[:, 2:]) / 2, wh[p_img], s, ps)
            out_mask = real & (conf > self.use_anchor_threshold) & ~sel
            rows.append((*self._emit_rows(conf, out_mask, level, len(rows), fixed_levels), boxes, conf))
            feats = self._probe_features(lvl, x[lvl], valid[lvl], p_img, crop)
            raw = self.proj_patch(self._tokens(feats, i)).view(-1, K2, 5)
            pred = torch.cat([torch.sigmoid(raw[..., :4]), raw[..., 4:]], -1)
            p_valid = p_valid.flatten()
            patches_out.append(PatchPredictions(
                4 if i == 1 else 3, pred, p_img, crop, torch.zeros_like(p_img), p_valid, s, ps,
            ))
            boxes, conf = self._to_image(pred.detach(), p_img, crop, wh, s)
            boxes, conf = boxes.view(B, k * K2, 4), conf.view(B, k * K2)
            real = p_valid.view(B, k).repeat_interleave(K2, 1)
            level = 4 if i == 1 else 3
        out_mask = real & (conf > self.use_anchor_threshold)
        rows.append((*self._emit_rows(conf, out_mask, level, len(rows), fixed_levels), boxes, conf))
        mask, key, levels, boxes, conf = (torch.cat(t, 1) for t in zip(*rows, strict=True))
        # order: by emission (key) or, for images over max_anchor, by score; emitted first
        count = mask.sum(1, keepdim=True)
        by_key = _row_rank(key)
        key_order = torch.sort(key, dim=1, stable=True).indices
        by_conf = torch.empty_like(by_key).scatter_(1, key_order, _row_rank(conf.gather(1, key_order), descending=True))
        slot = torch.where(count > self.max_anchor, by_conf, by_key)
        slot = torch.where(mask, slot, slot + mask.shape[1])
        n = self.max_anchor
        order = torch.sort(slot, dim=1, stable=True).indices[:, :n]
        if order.shape[1] < n:
            order = torch.cat([order, order[:, :1].expand(B, n - order.shape[1])], 1)
        out_valid = torch.arange(n, device=dev) < count.clamp(max=n)
        whole = torch.cat([wh / 2, wh], -1)[:, None, :].expand(B, n, 4)
        out_boxes = torch.where(out_valid[..., None], boxes.gather(1, order[..., None].expand(B, n, 4)), whole)
        out_scores = torch.where(out_valid, conf.gather(1, order), 0)
        out_levels = torch.where(out_valid, levels.gather(1, order), -1)
        return SparseAnchors(out_boxes, out_scores, out_valid, out_levels, patches_out)

    def _to_image(self, a: Tensor, p_img: Tensor, crop: Tensor, wh: Tensor, s: int) -> tuple[Tensor, Tensor]:
        """Patch predictions (P, K, 5) -> boxes (P, K, 4) in pixels and confidences (P, K): 0 for
        centres beyond the image and for boxes under 3 px (the official order of operations)."""
        ps = self.patch_size
        grid = (wh[p_img] / s).repeat(1, 2)[:, None, :]
        norm = a[..., :4] * (ps / grid)
        norm = torch.cat([norm[..., :2] + crop.to(a.dtype)[:, None, :] / grid[..., :2], norm[..., 2:]], -1)
        conf = torch.sigmoid(a[..., 4]).to(norm.dtype).masked_fill((norm[..., 0] >= 1) | (norm[..., 1] >= 1), 0)
        boxes = norm * wh.repeat(1, 2)[p_img][:, None, :]
        return boxes, conf.masked_fill((boxes[..., 2] < 3) | (boxes[..., 3] < 3), 0)

    def _emit_rows(self, conf, out_mask, level, stage, fixed_levels):
        """Which anchors of a stage (G, K) go to the output, their order keys and levels; the
        fixed stage gives at least ``min_anchor`` per image (its best, in score order)."""
        G, K = conf.shape
        dev = conf.device
        pos = torch.arange(G * K, device=dev).view(G, K)
        if level is None:
            rank = _row_rank(conf, descending=True)
            few = out_mask.sum(1, keepdim=True) < self.min_anchor
            out_mask = torch.where(few, rank < self.min_anchor, out_mask)
            pos = torch.where(few, rank, pos % K)
            levels = fixed_levels.expand(G, K)
        else:
            levels = torch.full_like(pos, level)
        return out_mask, stage * _BIG + pos, levels

    def _emit(self, cur, out_mask, level, stage, fixed_levels):
        """The anchors a stage hands to the output: (image, order key, box, conf, level) each."""
        boxes, conf, img = cur
        out_mask, key, levels = self._emit_rows(conf, out_mask, level, stage, fixed_levels)
        g, k = torch.nonzero(out_mask, as_tuple=True)
        return img[g], key[g, k], boxes[g, k], conf[g, k], levels[g, k]

    def _assemble(self, emitted, B, wh, patches_out) -> SparseAnchors:
        img, key, boxes, conf, levels = (torch.cat(t) for t in zip(*emitted, strict=True))
        dev, dtype = boxes.device, boxes.dtype
        counts = torch.bincount(img, minlength=B)
        over = (counts > self.max_anchor)[img]
        # rank of each anchor in its image by emission order, and by score (ties: emission order)
        by_key = torch.sort(key, stable=True).indices
        by_key = by_key[torch.sort(img[by_key], stable=True).indices]
        by_conf = by_key[torch.sort(conf[by_key], descending=True, stable=True).indices]
        by_conf = by_conf[torch.sort(img[by_conf], stable=True).indices]
        start = torch.cumsum(counts, 0) - counts
        rank_key = torch.empty_like(img)
        rank_key[by_key] = torch.arange(len(img), device=dev) - start[img[by_key]]
        rank_conf = torch.empty_like(img)
        rank_conf[by_conf] = torch.arange(len(img), device=dev) - start[img[by_conf]]
        slot = torch.where(over, rank_conf, rank_key)
        keep = slot < self.max_anchor
        img, slot = img[keep], slot[keep]
        n = int(counts.clamp(max=self.max_anchor).max()) if B else 0
        whole = torch.cat([wh / 2, wh], -1)  # padding: the whole image, as the official code
        out_boxes = whole[:, None, :].repeat(1, n, 1)
        out_boxes[img, slot] = boxes[keep]
        out_scores = torch.zeros(B, n, device=dev, dtype=dtype)
        out_scores[img, slot] = conf[keep]
        out_valid = torch.zeros(B, n, dtype=torch.bool, device=dev)
        out_valid[img, slot] = True
        out_levels = torch.full((B, n), -1, dtype=torch.long, device=dev)
        out_levels[img, slot] = levels[keep]
        return SparseAnchors(out_boxes, out_scores, out_valid, out_levels, patches_out)

    def _training_patches(self, crop, p_img, targets, wh, s, generated):
        """Training-time patches of one level (official ``generate_targets_crop_pos``): patches
        around small GT boxes (both sides < half a patch; NMS among them at ``nms_threshold``
        ranked by closeness to the others; the box near the patch's top-left corner, randomly
        jittered), used instead of generated patches before ``use_target_epoch`` (and emitted), or
        to top up images with fewer than 4 patches (not emitted); then random patches up to 4.
        Returns (crop_pos, image, emitted) ordered by image."""
        dev, dtype = wh.device, wh.dtype
        B, ps = len(targets), self.patch_size
        gt, present = padded_targets(targets, dev, dtype)
        gt = gt * wh.repeat(1, 2)[:, None, :]
        small = present & (gt[..., 2] < s * ps / 2) & (gt[..., 3] < s * ps / 2)
        d2 = ((gt[:, :, None, :2] - gt[:, None, :, :2]) ** 2).sum(-1)
        score = -(d2 * small[:, None, :]).sum(-1)
        b_idx, g_idx = torch.nonzero(small, as_tuple=True)
        xyxy = box_cxcywh_to_xyxy(gt[b_idx, g_idx])
        keep = nms(xyxy, score[b_idx, g_idx], self.nms_threshold, b_idx)
        keep = keep[torch.sort(b_idx[keep], stable=True).indices]  # by image, score order within
        g_img, box = b_idx[keep], xyxy[keep] / s
        pos = torch.floor(box[:, :2])
        pos = pos + (torch.ceil(wh[g_img] / s) - (pos + ps)).clamp(max=0)
        room = (pos + ps - box[:, 2:]).clamp(min=0)
        g_crop = torch.floor(pos - torch.rand_like(room) * room).long().clamp(min=0)

        if generated:
            n_gen = torch.bincount(p_img, minlength=B)
            need = (_MIN_TRAINING_PATCHES - n_gen).clamp(min=0)
            pick = _rank_within(g_img, B, torch.rand(len(g_img), device=dev)) < need[g_img]
            crops = [crop, g_crop[pick]]
            imgs = [p_img, g_img[pick]]
            emit = [torch.ones(len(p_img), dtype=torch.bool, device=dev), torch.zeros(int(pick.sum()), dtype=torch.bool, device=dev)]
        else:
            crops, imgs = [g_crop], [g_img]
            emit = [torch.ones(len(g_img), dtype=torch.bool, device=dev)]
        have = torch.bincount(torch.cat(imgs), minlength=B)
        need = (_MIN_TRAINING_PATCHES - have).clamp(min=0)
        r_img = torch.arange(B, device=dev).repeat_interleave(need)
        span = (torch.ceil(wh[r_img] / s) - ps).clamp(min=1)
        crops.append(torch.floor(torch.rand(len(r_img), 2, device=dev, dtype=dtype) * span).long())
        imgs.append(r_img)
        emit.append(torch.zeros(len(r_img), dtype=torch.bool, device=dev))
        crop, p_img, p_emit = torch.cat(crops), torch.cat(imgs), torch.cat(emit)
        order = torch.sort(p_img, stable=True).indices
        return crop[order], p_img[order], p_emit[order]


def _inside(x: Tensor, valid_hw: Tensor) -> Tensor:
    """(B, 1, H, W) mask of each image's valid cells of a (B, C, H, W) map."""
    rows = torch.arange(x.shape[2], device=x.device) < valid_hw[:, :1]
    cols = torch.arange(x.shape[3], device=x.device) < valid_hw[:, 1:]
    return (rows[:, :, None] & cols[:, None, :])[:, None]


def _nms_topk(boxes: Tensor, scores: Tensor, iou_threshold: float, k: int) -> tuple[Tensor, Tensor]:
    """The first ``k`` boxes greedy NMS keeps, per row, with static shapes: boxes (B, N, 4) xyxy,
    scores (B, N) (-inf: not a candidate). Greedy NMS keeps boxes in decreasing score order, so
    picking the best remaining box and dropping what it suppresses, k times, gives exactly its
    first k. Returns indices (B, k) and whether each is a real box (B, k)."""
    iou = box_iou(boxes, boxes)[0]
    idx, ok = [], []
    arange_n = torch.arange(scores.shape[1], device=scores.device)
    for _ in range(k):
        best = scores.argmax(1)  # the first of tied maxima, like the stable sort of nms()
        idx.append(best)
        ok.append(scores.gather(1, best[:, None])[:, 0] > -torch.inf)
        drop = (iou.gather(1, best[:, None, None].expand(-1, 1, iou.shape[2]))[:, 0] > iou_threshold)
        scores = scores.masked_fill(drop | (arange_n == best[:, None]), -torch.inf)
    return torch.stack(idx, 1), torch.stack(ok, 1)


def _row_rank(values: Tensor, descending: bool = False) -> Tensor:
    """Rank of each entry within its row of a (G, K) tensor (stable: ties in column order)."""
    order = torch.sort(values, dim=1, descending=descending, stable=True).indices
    rank = torch.empty_like(order)
    return rank.scatter_(1, order, torch.arange(values.shape[1], device=values.device).expand_as(order))


def _rank_within(groups: Tensor, n_groups: int, values: Tensor | None = None) -> Tensor:
    """Rank of each element within its group: by ``values`` (ascending) if given, else by position."""
    idx = torch.arange(len(groups), device=groups.device)
    order = idx if values is None else torch.sort(values, stable=True).indices
    order = order[torch.sort(groups[order], stable=True).indices]
    counts = torch.bincount(groups, minlength=n_groups)
    start = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(groups)
    rank[order] = idx - start[groups[order]]
    return rank
