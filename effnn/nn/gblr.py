"""``GaudiGBLRLinear``: a linear layer whose weight structure is learned (GBLR with Gaudi masks), and
``GBLRStructuredLinear``: the compact inference module it exports."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from effnn.ops._dispatch import BACKENDS
from effnn.ops.gblr import (
    EVAL_MASK_THRESHOLD,
    GBLRPacked,
    gaudi_mask,
    gblr_dense_weight,
    gblr_masked_linear,
    gblr_project,
    gblr_structured,
    pack_structure,
)

__all__ = ["GaudiGBLRLinear", "GBLRStructuredLinear"]


def _positive_int(owner: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")
    return value


def _init_ratio(spec: str, prefix: str, default: float) -> float:
    """The ratio written after ``prefix`` in an official init string ('splr', 'lr0.25'), or the
    default (1 / saving) when there is none."""
    tail = spec[len(prefix):]
    if not tail:
        return default
    try:
        return float(tail)
    except ValueError:
        raise ValueError(f"GaudiGBLRLinear: width_init {spec!r}: {tail!r} is not a number") from None


class GaudiGBLRLinear(nn.Module):
    r"""A linear layer whose weight is a generalized block-low-rank (GBLR) matrix with learned
    structure (Lee & Kim, "Differentiable Learning of Generalized Structured Matrices for Efficient
    Deep Neural Networks", ICLR 2024).

    :math:`W = \sum_k \mathrm{diag}(m^{out}_k)\, U_k V_k\, \mathrm{diag}(m^{in}_k)`: K components of
    rank r, each confined to a cyclic interval of input columns and one of output rows whose
    widths and locations are parameters, learned by gradient descent through the Gaussian-Dirichlet
    (Gaudi) mask (:func:`effnn.ops.gblr.gaudi_mask`); a proximal step on the widths
    (:mod:`effnn.train.gblr`) holds the layer, or the whole model, to a FLOP budget.

    Parameters and buffers are those of the official ``GaudiGBLR`` (changwoolee/Gaudi-GBLR,
    ``src/models/layers/gblr.py``), so its checkpoints load with ``load_state_dict``: ``widths``
    and ``locations`` (2, K) (row 0: input columns, row 1: output rows; fractions of the length),
    ``lr_weight1`` (K, r, in_features), ``lr_weight2`` (K, out_features, r), ``bias``
    (out_features,); buffers ``freq_in`` (in//2+1,), ``freq_out`` (out//2+1,), ``sigma`` ().

    Training runs the official dense computation (masks, the masked weight, one GEMM; the two
    factored GEMMs when the batch is small), leaving out the components whose two masks are empty
    (exactly: they contribute nothing and get zero gradients). Eval mode applies the official
    thresholds (widths of one element dropped, |mask| < 1e-3 zeroed). :meth:`to_structured` exports the trained
    structure to a :class:`GBLRStructuredLinear` that costs the structure's multiply-adds.

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``.
        rank_per_component: r, the rank of each component.
        num_components: K (at most min(in, out) // r), or
        total_rank_ratio: K = int(ratio * min(in, out)) // r. With neither, K = min(in, out) // r
            (the paper's configuration; the official layer raises instead).
        sigma: the Gaussian's width in frequency (official default 100; annealed during training
            with :class:`effnn.train.gblr.SigmaSchedule`). ``None`` turns the Gaussian off (the
            official ``no_gaussian=True``): the masks are exact boxcars, whatever the ``sigma``
            buffer holds.
        width_init: a float (every width), or the official strings "splr" (the first K/(2 saving)
            components full, the rest narrow: nominally the dense cost), "splr<ratio>",
            "lr" / "lr<ratio>" (the first K*ratio full, the rest one element wide in one
            dimension), "unif" (uniform in [0, 1]) or "zero".
        location_init: a float (every location), "linspace" (k/K) or "unif" (uniform in [0, 1]).
        backend: of :meth:`to_structured`'s module ("auto", "ref" or "triton"; "auto" picks the
            Triton kernel for CUDA tensors).

    The factors start as the SVD of a dense ``nn.Linear``-like draw (the official ViT's
    ``set_weights_from_dense_init``), so the output variance is that of ``nn.Linear``
    (times the masks' coverage); the official layer's own uniform draw is about K/3 times larger.

    Shape: input (..., in_features), output (..., out_features).

    Example::

        >>> layer = GaudiGBLRLinear(768, 768)               # K = 768 rank-1 components, 'splr'
        >>> layer(torch.randn(8, 197, 768)).shape
        torch.Size([8, 197, 768])
        >>> layer.eval().macs_per_token()                    # official count, ~ dense at 'splr'
        >>> small = GaudiGBLRLinear.from_linear(nn.Linear(768, 768), budget=0.4)
        >>> fast = small.eval().to_structured()             # compact inference module
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank_per_component: int = 1,
        num_components: int | None = None,
        total_rank_ratio: float | None = None,
        sigma: float | None = 100.0,
        width_init: float | str = "splr",
        location_init: float | str = 0.0,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        owner = "GaudiGBLRLinear"
        in_features = _positive_int(owner, "in_features", in_features)
        out_features = _positive_int(owner, "out_features", out_features)
        r = _positive_int(owner, "rank_per_component", rank_per_component)
        smaller = min(in_features, out_features)
        if r > smaller:
            raise ValueError(f"{owner}: rank_per_component={r} exceeds min(in, out)={smaller}")
        if total_rank_ratio is not None:
            if isinstance(total_rank_ratio, bool) or not 0 < float(total_rank_ratio) <= 1:
                raise ValueError(f"{owner}: total_rank_ratio must be in (0, 1], got {total_rank_ratio!r}")
            K = int(total_rank_ratio * smaller) // r
        elif num_components is not None:
            K = min(smaller // r, _positive_int(owner, "num_components", num_components))
        else:
            K = smaller // r
        if K < 1:
            raise ValueError(f"{owner}: total_rank_ratio={total_rank_ratio} leaves no component")
        if sigma is not None and (isinstance(sigma, bool) or not float(sigma) > 0):
            raise ValueError(f"{owner}: sigma must be a positive float or None (no Gaussian), got {sigma!r}")
        _check_init(width_init, location_init)
        if backend not in BACKENDS:
            raise ValueError(f"{owner}: backend must be one of {BACKENDS}, got {backend!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.rank_per_component = r
        self.num_components = K
        self.gaussian = sigma is not None
        self.sigma_init = math.inf if sigma is None else float(sigma)  # what reset_parameters restores
        self.width_init = width_init
        self.location_init = location_init
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        # registration order as the official layer's, so its optimizer states line up too
        self.widths = nn.Parameter(torch.empty(2, K, **factory))
        self.locations = nn.Parameter(torch.empty(2, K, **factory))
        # float32 frequencies, as the official torch.arange(0.0, n // 2 + 1, 1) (kept for its
        # checkpoints; the masks are computed from n). bfloat16 could not hold them exactly.
        freq = {"device": device, "dtype": torch.float64 if dtype == torch.float64 else torch.float32}
        self.register_buffer("freq_in", torch.arange(in_features // 2 + 1, **freq))
        self.register_buffer("freq_out", torch.arange(out_features // 2 + 1, **freq))
        self.register_buffer("sigma", torch.tensor(self.sigma_init, **factory))
        self.lr_weight1 = nn.Parameter(torch.empty(K, r, in_features, **factory))
        self.lr_weight2 = nn.Parameter(torch.empty(K, out_features, r, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    # ---- initialisation ---------------------------------------------------------------------

    @property
    def saving(self) -> float:
        """Parameters of the two factors over those of the dense weight (official ``saving``)."""
        return self.num_components * self.rank_per_component * (self.in_features + self.out_features) / (
            self.in_features * self.out_features
        )

    def reset_parameters(self) -> None:
        """Factors: SVD of a dense draw like ``nn.Linear``'s; bias as ``nn.Linear``; widths and
        locations from ``width_init``/``location_init`` as the official layer; the frequency
        buffers and ``sigma`` (its initial value: after ``to_empty`` the buffers hold garbage)."""
        with torch.no_grad():
            self.freq_in.copy_(torch.arange(self.in_features // 2 + 1))
            self.freq_out.copy_(torch.arange(self.out_features // 2 + 1))
            self.sigma.fill_(self.sigma_init)
            if self.lr_weight1.is_meta:
                self.reset_structure()
                return
            dense = torch.empty(self.out_features, self.in_features, dtype=torch.float32,
                                device=self.lr_weight1.device)
            nn.init.kaiming_uniform_(dense, a=math.sqrt(5))
            self.project_(dense)
            if self.bias is not None:  # the official fan-in of lr_weight1 (K, r, in): r * in
                bound = 1 / math.sqrt(self.rank_per_component * self.in_features)
                nn.init.uniform_(self.bias, -bound, bound)
        self.reset_structure()

    @torch.no_grad()
    def project_(self, weight: Tensor) -> None:
        """Set the factors to the truncated SVD of ``weight`` (out, in) at rank K r, singular values
        split evenly (the official ``set_weights_from_projection``); structure unchanged."""
        K, r = self.num_components, self.rank_per_component
        u, s, vh = torch.linalg.svd(weight.to(torch.float64 if weight.dtype == torch.float64 else torch.float32),
                                    full_matrices=False)
        root = s[: K * r].sqrt()
        u = u[:, : K * r] * root
        vh = vh[: K * r] * root.unsqueeze(1)
        self.lr_weight1.copy_(vh.view(K, r, self.in_features))
        self.lr_weight2.copy_(u.view(self.out_features, K, r).transpose(0, 1))

    @torch.no_grad()
    def reset_structure(self) -> None:
        """Widths and locations from ``width_init`` and ``location_init`` (official
        ``reset_mask_parameters``)."""
        K = self.num_components
        loc = self.location_init
        if isinstance(loc, str) and loc == "linspace":
            line = torch.linspace(0.0, K - 1, K) / K
            self.locations.copy_(torch.stack([line, line]))
        elif isinstance(loc, str):
            nn.init.uniform_(self.locations, 0.0, 1.0)
        else:
            nn.init.constant_(self.locations, float(loc))
        spec = self.width_init
        widths = torch.empty(2, K, dtype=torch.float64)
        if not isinstance(spec, str):
            widths.fill_(float(spec))
        elif spec == "unif":
            widths.uniform_(0.0, 1.0, generator=None)
        elif spec.startswith("splr"):
            ratio = _init_ratio(spec, "splr", 1 / self.saving)
            full = int(K * ratio * 0.5)
            widths.fill_(1.0)
            if full < K:  # ratio < 2 (the official formula divides by zero at 2, with no rest)
                widths[:, full:] = 0.5 * ratio / (1 - 0.5 * ratio)
        elif spec.startswith("lr"):
            ratio = _init_ratio(spec, "lr", 1 / self.saving)
            full = int(K * ratio)
            widths.zero_()
            widths[:, :full] = 1.0
            # the rest one element wide in one dimension (alternating, counted from `full`)
            widths[0, full::2] = 1 / self.in_features
            widths[1, full + 1::2] = 1 / self.out_features
        else:  # "zero"
            widths[0, ::2] = 0.0
            widths[0, 1::2] = 1 / self.in_features
            widths[1, 1::2] = 0.0
            widths[1, ::2] = 1 / self.out_features
        if not self.widths.is_meta:
            self.widths.copy_(widths)

    # ---- forward ----------------------------------------------------------------------------

    def _sigma(self) -> Tensor:
        return self.sigma if self.gaussian else torch.full_like(self.sigma, math.inf)

    def masks(self) -> tuple[Tensor, Tensor]:
        """(mask_in (K, in), mask_out (K, out)) of the current mode (official ``get_mask_by_ind``)."""
        hard = not self.training
        sigma = self._sigma()
        mask_in = gaudi_mask(self.widths[0], self.locations[0], sigma, self.in_features, hard=hard)
        mask_out = gaudi_mask(self.widths[1], self.locations[1], sigma, self.out_features, hard=hard)
        return mask_in, mask_out

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"GaudiGBLRLinear: input must be a Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"GaudiGBLRLinear: input must have shape (..., {self.in_features}), got {tuple(x.shape)}"
            )
        autocast = x.device.type != "meta" and torch.is_autocast_enabled(x.device.type)
        if not autocast and x.dtype != self.lr_weight1.dtype:
            raise TypeError(
                f"GaudiGBLRLinear: input has dtype {x.dtype} but the layer has {self.lr_weight1.dtype}; "
                "cast one of them (or run under torch.autocast)"
            )
        mask_in, mask_out = self.masks()
        return gblr_masked_linear(x, self.lr_weight1, self.lr_weight2, mask_in, mask_out, self.bias)

    def extra_repr(self) -> str:
        sigma = f"{float(self.sigma):g}" if self.gaussian and not self.sigma.is_meta else ("None" if not self.gaussian else "?")
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank_per_component={self.rank_per_component}, num_components={self.num_components}, "
            f"sigma={sigma}, bias={self.bias is not None}"
        )

    # ---- structure and cost -----------------------------------------------------------------

    def set_sigma(self, sigma: float) -> None:
        """Write the ``sigma`` buffer (no effect on the masks while the Gaussian is off)."""
        if isinstance(sigma, bool) or not float(sigma) > 0:
            raise ValueError(f"GaudiGBLRLinear.set_sigma: sigma must be positive, got {sigma!r}")
        self.sigma.fill_(float(sigma))

    @torch.no_grad()
    def macs_per_token(self) -> int:
        """The official multiply-add count per input vector (``GaudiGBLR.get_num_params``).

        A component counts if both rounded widths exceed one element; its lengths are the numbers
        of mask entries above 1e-3 (so they include the Gaussian's tails at finite sigma: at
        sigma=inf they are the integer widths); it costs min(r (a + b), a b).
        """
        length_in = torch.round(self.widths[0] * self.in_features)
        length_out = torch.round(self.widths[1] * self.out_features)
        live = ((length_in > 1) & (length_out > 1)).float()
        mask_in, mask_out = self.masks()
        # the official expression, operation for operation in float32 (its rounding included)
        b = torch.ceil((mask_in > EVAL_MASK_THRESHOLD).float().mean(1) * live * self.in_features)
        a = torch.ceil((mask_out > EVAL_MASK_THRESHOLD).float().mean(1) * live * self.out_features)
        cost = torch.minimum((a + b) * self.rank_per_component, a * b)
        return int(cost.sum().item())

    def dense_weight(self) -> Tensor:
        """The (out_features, in_features) matrix of the current mode (without bias)."""
        mask_in, mask_out = self.masks()
        return gblr_dense_weight(self.lr_weight1, self.lr_weight2, mask_in, mask_out)

    def to_linear(self) -> nn.Linear:
        """The ``nn.Linear`` that computes what this layer computes in eval mode."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.lr_weight1.device, dtype=self.lr_weight1.dtype)
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                linear.weight.copy_(self.dense_weight())
                if self.bias is not None:
                    linear.bias.copy_(self.bias)
        finally:
            self.train(was_training)
        return linear

    @torch.no_grad()
    def to_structured(self, backend: str | None = None) -> GBLRStructuredLinear:
        """The compact inference module of this layer's eval-mode computation.

        The eval-mode masks (at the current sigma; exact boxcars with the Gaussian off or at large
        sigma) are cropped to their support and folded into the factors, dead components are
        dropped, and the rest are packed into groups (:func:`effnn.ops.gblr.pack_structure`). Its
        output equals this layer's in eval mode; it costs ``macs_per_token`` of the result.
        """
        was_training = self.training
        self.eval()
        try:
            mask_in, mask_out = self.masks()
        finally:
            self.train(was_training)
        packed = pack_structure(self.lr_weight1, self.lr_weight2, mask_in, mask_out)
        bias = None if self.bias is None else self.bias.detach().clone()
        return GBLRStructuredLinear(packed, bias, backend=self.backend if backend is None else backend)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        budget: float,
        *,
        rank_per_component: int = 1,
        num_components: int | None = None,
        sigma: float | None = None,
        backend: str = "auto",
        **project_kwargs,
    ) -> GaudiGBLRLinear:
        """A layer that approximates ``linear`` at ``budget`` x its dense multiply-adds.

        ``budget`` in (0, 1]: the official cost (:meth:`macs_per_token`, with the Gaussian off) is
        at most ``budget * in * out``. The structure and factors come from
        :func:`effnn.ops.gblr.gblr_project`: the best of the truncated SVD of the same cost, a
        greedy multi-scale block pursuit (refitted), and ``steps`` steps of gradient descent on the
        masked product as the official ``find_olb`` (pass ``steps=0`` to skip the descent, which
        costs about 2 minutes for a 768 x 768 weight on one CPU thread; ``project_kwargs`` go to
        ``gblr_project``). ``sigma=None`` (default) keeps the Gaussian
        off, as for the official fine-tuning from a dense checkpoint. On the ``meta`` device the
        parameters stay uninitialised.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"GaudiGBLRLinear.from_linear: linear must be an nn.Linear, got {type(linear).__name__}")
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
            raise ValueError(f"GaudiGBLRLinear.from_linear: budget must be in (0, 1], got {budget!r}")
        weight = linear.weight
        with torch.device("meta"):
            layer = cls(linear.in_features, linear.out_features, rank_per_component=rank_per_component,
                        num_components=num_components, sigma=sigma, bias=linear.bias is not None, dtype=weight.dtype, backend=backend)
        layer.to_empty(device=weight.device)
        with torch.no_grad():
            layer.freq_in.copy_(torch.arange(layer.in_features // 2 + 1))
            layer.freq_out.copy_(torch.arange(layer.out_features // 2 + 1))
            layer.sigma.fill_(math.inf if sigma is None else float(sigma))
        if weight.is_meta:
            return layer
        with torch.no_grad():
            widths, locations, w1, w2 = gblr_project(
                weight.detach(), budget, num_components=layer.num_components,
                rank_per_component=rank_per_component, **project_kwargs,
            )
            layer.widths.copy_(widths)
            layer.locations.copy_(locations)
            layer.lr_weight1.copy_(w1)
            layer.lr_weight2.copy_(w2)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer


def _check_init(width_init, location_init) -> None:
    owner = "GaudiGBLRLinear"
    if isinstance(width_init, str):
        if not (width_init in ("unif", "zero") or width_init.startswith("splr") or width_init.startswith("lr")):
            raise ValueError(
                f"{owner}: width_init must be a float, 'splr', 'splr<ratio>', 'lr', 'lr<ratio>', 'unif' "
                f"or 'zero', got {width_init!r}"
            )
        for prefix in ("splr", "lr"):
            if width_init.startswith(prefix):
                _init_ratio(width_init, prefix, 1.0)
                break
    elif isinstance(width_init, bool) or not isinstance(width_init, (int, float)):
        raise ValueError(f"{owner}: width_init must be a float or an init name, got {width_init!r}")
    if isinstance(location_init, str):
        if location_init not in ("linspace", "unif"):
            raise ValueError(f"{owner}: location_init must be a float, 'linspace' or 'unif', got {location_init!r}")
    elif isinstance(location_init, bool) or not isinstance(location_init, (int, float)):
        raise ValueError(f"{owner}: location_init must be a float or an init name, got {location_init!r}")


class GBLRStructuredLinear(nn.Module):
    """The compact inference form of a :class:`GaudiGBLRLinear`: its hard structure executed as
    what it is (Lee & Kim, ICLR 2024; the official code has no such path).

    Per group of components sharing an interval: gather the input columns it covers, a small
    product with its packed factor, and add into the output rows it covers
    (:func:`effnn.ops.gblr.gblr_structured`). It costs ``macs_per_token`` multiply-adds per vector
    -- the structure's, plus the zero padding inside groups -- instead of in*out.

    Build it with :meth:`GaudiGBLRLinear.to_structured`. Parameters ``in_factor``, ``out_factor``
    (flat packed blocks) and ``bias``; buffers ``in_meta``, ``out_meta``, ``perm`` describe the
    groups (see :class:`effnn.ops.gblr.GBLRPacked`). Differentiable (the structure is fixed).

    Shape: input (..., in_features), output (..., out_features).

    Example::

        >>> fast = GaudiGBLRLinear(768, 768).eval().to_structured()
        >>> fast(torch.randn(4, 768)).shape
        torch.Size([4, 768])
    """

    def __init__(self, packed: GBLRPacked, bias: Tensor | None = None, backend: str = "auto") -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"GBLRStructuredLinear: backend must be one of {BACKENDS}, got {backend!r}")
        self.in_features = packed.in_features
        self.out_features = packed.out_features
        self.backend = backend
        self.in_factor = nn.Parameter(packed.in_factor.detach().clone())
        self.out_factor = nn.Parameter(packed.out_factor.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.register_buffer("in_meta", packed.in_meta.clone())
        self.register_buffer("out_meta", packed.out_meta.clone())
        self.register_buffer("perm", packed.perm.clone())

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, Tensor], in_features: int, out_features: int,
                        backend: str = "auto") -> GBLRStructuredLinear:
        """Rebuild a saved module (its structure is in the buffers of the state dict)."""
        keys = ("in_factor", "in_meta", "out_factor", "out_meta", "perm")
        missing = [k for k in keys if k not in state_dict]
        if missing:
            raise ValueError(f"GBLRStructuredLinear.from_state_dict: missing {missing}")
        packed = GBLRPacked(*(state_dict[k] for k in keys), in_features, out_features)
        return cls(packed, state_dict.get("bias"), backend=backend)

    def packed(self) -> GBLRPacked:
        return GBLRPacked(self.in_factor, self.in_meta, self.out_factor, self.out_meta, self.perm,
                          self.in_features, self.out_features)

    @property
    def macs_per_token(self) -> int:
        """Multiply-adds per input vector (what ``FlopCounterMode`` counts, halved)."""
        return self.in_factor.numel() + self.out_factor.numel()

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"GBLRStructuredLinear: input must be a Tensor, got {type(x).__name__}")
        return gblr_structured(x, self.packed(), self.bias, backend=self.backend)

    def to_linear(self) -> nn.Linear:
        """The exact dense equivalent."""
        eye = torch.eye(self.in_features, dtype=self.in_factor.dtype, device=self.in_factor.device)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=eye.device, dtype=eye.dtype)
        with torch.no_grad():
            linear.weight.copy_(gblr_structured(eye, self.packed(), None, backend="ref").t())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        dense = self.in_features * self.out_features
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"groups=({self.in_meta.shape[0]}, {self.out_meta.shape[0]}), "
            f"macs_per_token={self.macs_per_token} ({self.macs_per_token / dense:.1%} of dense), "
            f"bias={self.bias is not None}"
        )
