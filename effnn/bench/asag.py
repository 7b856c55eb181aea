"""Benchmark case of ``SparseAnchorGenerator`` (ASAG) against the official-style dense compression.

The official ``AnchorGenerator.forward`` (iSEE-Laboratory/ASAG, models/anchor_generator.py)
compresses all three maps whole (``compress[i]``: 1x1 conv 256->128, activation, 3x3 conv ->8) at
the start of every call and crops the probing patches from the compressed P4 and P3, even when
probing stops early. effnn's generator compresses only the cells under the probed patches. The
baseline, :class:`DenseCompressionGenerator`, is effnn's generator with the official order of
work: P3 and P4 compressed whole at the start of every call (cells outside the image zeroed, as
effnn does), patches cropped from them; everything else (fixed stage, selection, NMS, the MLPs,
the output) is the same code with the same weights, so both providers return the same anchors
and differ only in how much of P3/P4 they compress.

Shape spec ``HxW``: one image of that size (batch 1), with FPN maps of 256 channels at strides
8, 16, 32 of the image padded to a multiple of 32 (800x1333 -> P3 100x168, P4 50x84, P5 25x42),
random normal features. With the official random initialisation every box is about half the
image and nothing is probed, so the heads are biased as a trained generator behaves: the last
layer of ``proj_all`` and ``proj_patch`` has its weights scaled by 0.05, width and height biases
-2.5 (boxes ~8% of their patch, small enough to be selected) and confidence biases spread
linearly over -3 .. 1.5 across the anchor slots (some anchors of middling confidence). This probes
5 patches on P4 and 5 on P3 at both default sizes (the paper: ~4.9 and ~4.5 per COCO image,
Table 5b) and emits 135 anchors.

Modes. ``forward`` (eval mode, no grad) is the meaningful one: the saving is at inference.
``forward+backward`` runs the same eval-mode call and backpropagates into every patch's raw
predictions (the tensor both workloads return), i.e. the gradient cost of the compression and the
heads for the same patches; it is not the generator's training step (which adds ground-truth and
random patches, the P6 flips and the Hungarian criterion). FLOPs: the forward is counted with
``FlopCounterMode``; forward+backward is 3x that.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from effnn.bench.registry import (
    BASELINE,
    FORWARD,
    TRAIN,
    Case,
    Layer,
    Setting,
    Workload,
    parse_ints,
    register_layer,
)
from effnn.nn.asag import SparseAnchorGenerator

FORMAT = "HxW of the input image (e.g. 800x1333)"
D_MODEL = 256
STRIDES = (8, 16, 32)


class DenseCompressionGenerator(SparseAnchorGenerator):
    """The official order of work: P3 and P4 compressed whole at the start of every call, probing
    patches cropped from the compressed maps. Same parameters and anchors as the parent."""

    def _prepare(self, x, sizes):
        wh, whwh, valid = super()._prepare(x, sizes)
        self._dense = [self._compress_dense(lvl, x[lvl], valid[lvl]) for lvl in (0, 1)]
        return wh, whwh, valid

    def _probe_features(self, level, x, valid_hw, img, crop_pos):
        return self._crop(self._dense[level], valid_hw, img, crop_pos)

    def forward(self, *args, **kwargs):
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._dense = None  # do not hold the maps (or their graph) between calls


class PatchPredictionsOf(nn.Module):
    """``generator([p3, p4, p5], image_sizes)`` -> every patch's raw predictions, flattened into one
    tensor (the anchors themselves are detached from the graph, these are what a loss reaches)."""

    def __init__(self, generator: SparseAnchorGenerator) -> None:
        super().__init__()
        self.generator = generator

    def forward(self, p3: Tensor, p4: Tensor, p5: Tensor, image_sizes: Tensor) -> Tensor:
        out = self.generator([p3, p4, p5], image_sizes)
        return torch.cat([p.pred.flatten() for p in out.patches])


def biased_generator(cls: type[SparseAnchorGenerator], s: Setting) -> SparseAnchorGenerator:
    """A default generator (eval mode) whose heads predict small boxes of middling confidence, so
    that P4 and P3 are probed (see the module docstring)."""
    gen = cls(D_MODEL, device=s.device, dtype=s.dtype).eval()
    with torch.no_grad():
        for head in (gen.proj_all, gen.proj_patch):
            last = head.layers[-1]
            last.weight.mul_(0.05)
            b = last.bias.view(-1, 5)
            b[:, 2:4] = -2.5
            b[:, 4] = torch.linspace(-3, 1.5, b.shape[0])
    return gen


def asag_case(spec: str) -> Case:
    H, W = parse_ints(spec, 2, FORMAT)
    Hp, Wp = -(-H // 32) * 32, -(-W // 32) * 32
    cells = sum((Hp // s) * (Wp // s) for s in STRIDES)

    def build(provider: str, s: Setting) -> Workload:
        factory = {"device": s.device, "dtype": s.dtype}
        feats = tuple(torch.randn(1, D_MODEL, Hp // st, Wp // st, **factory) for st in STRIDES)
        sizes = torch.tensor([[H, W]], device=s.device)
        cls = DenseCompressionGenerator if provider == BASELINE else SparseAnchorGenerator
        fn = PatchPredictionsOf(biased_generator(cls, s))
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn(*feats, sizes)
        fwd = float(counter.get_total_flops())
        return Workload(fn, (*feats, sizes), {FORWARD: fwd, TRAIN: 3.0 * fwd}, cells,
                        backend="torch" if provider == BASELINE else "ref")

    return Case(
        layer="asag",
        name=f"{H}x{W}",
        shape=f"image {H}x{W} batch=1, FPN P3-P5 {D_MODEL} ch, heads biased to probe P4 and P3",
        build=build,
        cost=Hp * Wp,
    )


ASAG = register_layer(
    Layer(
        name="asag",
        title="SparseAnchorGenerator vs the official dense P3/P4 compression",
        baseline="dense compression",
        shape_format=FORMAT,
        parse=asag_case,
        defaults=("800x1333", "512x512"),
        backends=("ref",),
    )
)
