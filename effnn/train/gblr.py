"""Training machinery of GBLR (Lee & Kim, ICLR 2024) as plain functions and small objects.

The official code (changwoolee/Gaudi-GBLR) runs these as Lightning callbacks; here a training loop
calls them directly::

    groups = gblr_param_groups(model, weight_decay=0.05, structure_lr=1e-3)
    opt = torch.optim.AdamW(groups, lr=1e-3)
    sigma = SigmaSchedule(1.0, 100.0, start=5, end=300)
    for epoch in range(epochs):
        sigma.apply(model, epoch)                                   # SigmaAnnealing
        for x, y in loader:
            loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad()
            soft_shrink_widths(model, lr=opt.param_groups[-1]["lr"],  # TargetedSoftshrink
                               thres=0.04, target_width=0.12)
    print(model_macs(model, example) / 1e9, "GMACs")

Official sources: ``src/callbacks/fm_sigma_annealing.py`` (``SigmaAnnealing``),
``src/callbacks/shrink.py`` (``Softshrink``, ``TargetedSoftshrink``, ``MeanShrink``),
``src/optim/param_grouping.py`` and the ``_optim`` dicts of ``GaudiGBLR``,
``GaudiGBLR.get_num_params`` and ``src/utils/flops.py``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from effnn._dtensor import full_tensor
from effnn.nn.gblr import GaudiGBLRLinear

__all__ = [
    "SigmaSchedule",
    "gblr_layers",
    "gblr_param_groups",
    "mean_shift_widths",
    "mean_width",
    "model_macs",
    "official_complexity",
    "soft_shrink_widths",
]


def gblr_layers(model: nn.Module) -> list[GaudiGBLRLinear]:
    """Every :class:`GaudiGBLRLinear` in ``model`` (``model`` itself included)."""
    return [m for m in model.modules() if isinstance(m, GaudiGBLRLinear)]


class SigmaSchedule:
    """Linear annealing of the Gaussian's sigma (the official ``SigmaAnnealing``).

    ``schedule(t)``: ``sigma_init`` before ``start``, linear to ``sigma_final`` at ``end``,
    ``sigma_final`` after; ``t`` is an epoch (as the official callback, called at each epoch
    start) or a step (its per-batch variant). ``apply(model, t)`` writes it into every layer's
    ``sigma`` buffer and returns it. Official ViT recipes: 1 -> 100 over epochs 5 -> 300.
    """

    def __init__(self, sigma_init: float, sigma_final: float, start: float, end: float) -> None:
        for name, value in (("sigma_init", sigma_init), ("sigma_final", sigma_final)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"SigmaSchedule: {name} must be a positive number, got {value!r}")
        if not start < end:
            raise ValueError(f"SigmaSchedule: start must be before end, got start={start!r}, end={end!r}")
        self.sigma_init, self.sigma_final = float(sigma_init), float(sigma_final)
        self.start, self.end = start, end

    def __call__(self, t: float) -> float:
        if t < self.start:
            return self.sigma_init
        if t > self.end:
            return self.sigma_final
        frac = (t - self.start) / (self.end - self.start)
        return self.sigma_init + (self.sigma_final - self.sigma_init) * frac

    def apply(self, model: nn.Module, t: float) -> float:
        sigma = self(t)
        with torch.no_grad():
            for layer in gblr_layers(model):
                layer.set_sigma(sigma)
        return sigma

    def __repr__(self) -> str:
        return f"SigmaSchedule({self.sigma_init:g} -> {self.sigma_final:g}, start={self.start}, end={self.end})"


def _assign(param: Tensor, value: Tensor) -> None:
    """param <- value (a whole tensor, the same on every rank); a DTensor keeps its own shard."""
    if hasattr(param, "full_tensor"):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
    param.copy_(value)


def _layer_mean_width(layer: GaudiGBLRLinear) -> Tensor:
    w = full_tensor(layer.widths)
    return (((w[0:1] * w[1:2]) > 0).to(w.dtype) * w).mean()


def mean_width(model: nn.Module | Iterable[GaudiGBLRLinear]) -> float:
    """The official budget statistic: per layer, the mean of both rows of ``widths`` over
    components whose two widths are positive (others count as 0), averaged over layers."""
    layers = gblr_layers(model) if isinstance(model, nn.Module) else list(model)
    if not layers:
        raise ValueError("mean_width: no GaudiGBLRLinear layer found")
    with torch.no_grad():
        return float(sum(_layer_mean_width(layer) for layer in layers) / len(layers))


@torch.no_grad()
def soft_shrink_widths(
    model: nn.Module,
    lr: float,
    thres: float,
    target_width: float = 0.0,
    *,
    cont: bool = False,
    p: float = 1.0,
    min_widths: tuple[float, float] = (0.0, 0.0),
    max_widths: tuple[float, float] = (1.0, 1.0),
    freeze: bool = False,
    init_thres: float | None = None,
    progress: float = 1.0,
) -> float:
    """The proximal step of the l1 penalty on widths, after an optimizer step (official
    ``TargetedSoftshrink``; ``target_width=0`` is the plain ``Softshrink``).

    lambda = thres * lr (``lr``: the current learning rate of the widths' group, as the official
    ``optimizer.param_groups[-1]['lr']``). With ``target_width > 0`` the step pauses (lambda = 0)
    while :func:`mean_width` is below the target -- a network-wide budget, so the layers' shares
    are learned; ``cont=True`` scales thres by ((mean - target) / (1 - target)) ** p instead of
    switching. Widths of layers whose widths require grad become clamp(softshrink(w, lambda),
    min, max) per row; locations wrap into [0, 1). ``freeze``: once lambda is 0, stop learning
    the structure (``requires_grad_(False)`` on widths and locations).

    The official ``AdaptiveSoftshrink`` warm-up (ViT-B from scratch): pass ``init_thres`` and
    ``progress`` in [0, 1] (0 before its start epoch, linear in batches to 1 at its end epoch);
    the threshold is ``init_thres`` at 0 -- unconditionally, no target check -- blended linearly
    into the targeted one above. Returns lambda.
    """
    if not thres >= 0 or not lr >= 0:
        raise ValueError(f"soft_shrink_widths: thres and lr must be >= 0, got thres={thres!r}, lr={lr!r}")
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"soft_shrink_widths: progress must be in [0, 1], got {progress!r}")
    layers = gblr_layers(model)
    if not layers:
        raise ValueError("soft_shrink_widths: no GaudiGBLRLinear layer found")
    if target_width > 0 and (init_thres is None or progress > 0):
        mean = mean_width(layers)
        if mean < target_width:
            thres = 0.0
        elif cont:
            thres = thres * ((mean - target_width) / (1.0 - target_width)) ** p
    if init_thres is not None:
        thres = progress * thres + (1.0 - progress) * init_thres
    lambd = thres * lr
    for layer in layers:
        if not layer.widths.requires_grad:
            continue
        widths = full_tensor(layer.widths).clone()
        for row in (0, 1):
            shrunk = F.softshrink(widths[row], lambd) if lambd > 0 else widths[row]
            widths[row] = shrunk.clamp(min_widths[row], max_widths[row])
        _assign(layer.widths, widths)
        layer.locations.sub_(layer.locations.floor())
        if freeze and lambd == 0:
            layer.widths.requires_grad_(False)
            layer.locations.requires_grad_(False)
    return lambd


@torch.no_grad()
def mean_shift_widths(model: nn.Module, target_width: float, lambd: float = 1.0) -> float:
    """The official ``MeanShrink`` (GPT-2 fine-tuning): while :func:`mean_width` exceeds
    ``target_width``, subtract ``lambd * (mean - target)`` from every width (``lambd=1`` lands on
    the target in one step, a projection rather than an l1 prox); clamp to [0, 1]; wrap
    locations. Returns the amount subtracted."""
    layers = [layer for layer in gblr_layers(model) if layer.widths.requires_grad]
    if not layers:
        raise ValueError("mean_shift_widths: no GaudiGBLRLinear layer with trainable widths")
    mean = mean_width(layers)
    shift = lambd * (mean - target_width) if mean > target_width else 0.0
    for layer in layers:
        layer.widths.sub_(shift).clamp_(0.0, 1.0)
        layer.locations.sub_(layer.locations.floor())
    return shift


def gblr_param_groups(
    model: nn.Module,
    weight_decay: float,
    structure_lr: float,
    location_lr: float | None = None,
    betas: tuple[float, float] = (0.0, 0.999),
) -> list[dict]:
    """AdamW parameter groups as the official ``group_parameters_for_optimizer`` builds them.

    [weights with decay (matrices, the GBLR factors included), the rest without decay (biases,
    norms, embeddings' 1-D parameters), widths and locations (lr ``structure_lr``, betas
    (0, 0.999): no first moment, no decay; the official configs give both the same learning rate,
    which makes them one group; a different ``location_lr`` makes a last, fourth group)]. Here
    parameters of two or more dimensions decay and the others do not; the official rule also
    exempts nn.Embedding weights and the names in the model's ``no_weight_decay()``. The
    structure groups come last, so ``optimizer.param_groups[-1]['lr']`` is the
    structure learning rate that :func:`soft_shrink_widths` scales lambda by. Other groups take
    the optimizer's defaults (lr, betas).
    """
    structure = {id(p) for layer in gblr_layers(model) for p in (layer.widths, layer.locations)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad or id(p) in structure:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    layers = gblr_layers(model)
    widths = [layer.widths for layer in layers if layer.widths.requires_grad]
    locations = [layer.locations for layer in layers if layer.locations.requires_grad]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    structure = {"betas": betas, "weight_decay": 0.0}
    if location_lr is None or location_lr == structure_lr:
        # one group, as the official grouping makes of equal hyper-parameter dicts
        groups.append({"params": widths + locations, "lr": structure_lr, **structure})
    else:
        groups.append({"params": widths, "lr": structure_lr, **structure})
        groups.append({"params": locations, "lr": location_lr, **structure})
    return [g for g in groups if g["params"]]


def model_macs(model: nn.Module, *inputs, **kwargs) -> int:
    """Multiply-adds of ``model(*inputs, **kwargs)`` with each GBLR layer at its official cost.

    Every op is counted by ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per
    multiply-add), except inside :class:`GaudiGBLRLinear` layers, whose cost is replaced by the
    number of vectors they processed times :meth:`GaudiGBLRLinear.macs_per_token` (the official
    ``get_num_params``; its masks are the current mode's, at the current sigma). The model runs
    once, without gradients.
    """
    layers = gblr_layers(model)
    inside: dict[int, float] = {}
    vectors: dict[int, int] = {}
    counter = FlopCounterMode(display=False)

    def before(module, args):
        inside[id(module)] = inside.get(id(module), 0.0) - counter.get_total_flops()
        vectors[id(module)] = vectors.get(id(module), 0) + args[0].numel() // module.in_features

    def after(module, args, output):
        inside[id(module)] += counter.get_total_flops()

    handles = []
    for layer in layers:
        handles.append(layer.register_forward_pre_hook(before))
        handles.append(layer.register_forward_hook(after))
    try:
        with torch.no_grad(), counter:
            model(*inputs, **kwargs)
    finally:
        for h in handles:
            h.remove()
    total = counter.get_total_flops() // 2
    for layer in layers:
        if id(layer) in vectors:
            total += vectors[id(layer)] * layer.macs_per_token() - int(inside[id(layer)]) // 2
    return int(total)


def official_complexity(model: nn.Module, *inputs, num_tokens: int | None = None, **kwargs) -> int:
    """The official complexity of a GBLR ViT (``src/utils/flops.py::profile_fvcore_sinc_gaussian``,
    logged as ``flop_ratio`` = this / ``baseline_complexity``), in multiply-adds.

    It is the sum, over the *leaf* modules of ``model`` (those without children), of:

    - a :class:`GaudiGBLRLinear`: ``num_tokens * macs_per_token()`` (``get_num_params``; its masks
      are the current mode's at the current sigma; the official callback runs in eval mode), whether
      or not it ran; then, as the official code, an ``fc2`` and its sibling ``fc1`` both count 0 if
      either does, and ``q_proj``, ``k_proj`` count 0 if their sibling ``v_proj`` does;
    - any other leaf: its own cost in ``model(*inputs, **kwargs)`` (run once, without
      gradients), as fvcore's ``by_module()`` gives it for the leaves of a ViT: matrix products
      and convolutions as ``FlopCounterMode`` counts them, halved (1 per multiply-add, no bias
      adds: fvcore's count of ``nn.Linear`` and ``nn.Conv2d``), plus 5 per input element of an
      ``nn.LayerNorm`` with a weight (4 without; fvcore's estimate); activations, dropout,
      softmax and element-wise ops 0.

    Ops that a non-leaf module runs itself are not counted, as in the official sum: in a ViT the
    attention products QK^T and attention x V (in the attention module's forward), the class-token
    concatenation and the position-embedding add. ``num_tokens`` defaults to
    ``model.patch_embed.num_patches`` (196 for ViT-B/16: the class token is not counted for GBLR
    layers, while dense leaves such as ``attn.proj`` process all 197 tokens). The official code's
    other branch (token-mixing layers of an MLP-Mixer, counted per feature) is not reproduced.
    """
    if num_tokens is None:
        num_tokens = getattr(getattr(model, "patch_embed", None), "num_patches", None)
        if num_tokens is None:
            raise ValueError("official_complexity: num_tokens not given and model.patch_embed.num_patches not found")
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
        raise ValueError(f"official_complexity: num_tokens must be a positive int, got {num_tokens!r}")
    counter = FlopCounterMode(display=False)
    counts: dict[str, int] = {}
    handles = []

    def hooks(name: str):
        start: list[int] = []

        def before(module, args):
            start.append(counter.get_total_flops())

        def after(module, args, output):
            own = (counter.get_total_flops() - start.pop()) // 2
            if isinstance(module, nn.LayerNorm):
                own += (5 if module.weight is not None else 4) * args[0].numel()
            counts[name] = counts.get(name, 0) + own

        return before, after

    gblr = {}
    for name, module in model.named_modules():
        if isinstance(module, GaudiGBLRLinear):
            gblr[name] = module
        elif next(module.children(), None) is None:
            before, after = hooks(name)
            handles.append(module.register_forward_pre_hook(before))
            handles.append(module.register_forward_hook(after))
    try:
        with torch.no_grad(), counter:
            model(*inputs, **kwargs)
    finally:
        for h in handles:
            h.remove()
    for name, layer in gblr.items():
        counts[name] = num_tokens * layer.macs_per_token()
    for name in gblr:
        parent, _, leaf = name.rpartition(".")
        sibling = f"{parent}.{{}}" if parent else "{}"
        if leaf == "fc2" and sibling.format("fc1") in counts:
            if counts[name] == 0 or counts[sibling.format("fc1")] == 0:
                counts[name] = counts[sibling.format("fc1")] = 0
        if leaf == "v_proj" and counts[name] == 0:
            for other in ("q_proj", "k_proj"):
                if sibling.format(other) in counts:
                    counts[sibling.format(other)] = 0
    return int(sum(counts.values()))
