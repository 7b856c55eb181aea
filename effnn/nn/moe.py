"""A reference sparse mixture-of-experts layer (``MoE``) and the dense FFN it gathers into
(``FeedForward``).

``MoE`` is the top-k gated FFN layer of the Switch Transformer (Fedus et al., JMLR 2022), V-MoE
(Riquelme et al., NeurIPS 2021) and WideNet (Xue et al., AAAI 2022; ``XueFuzhao/WideNet_Code``,
``widenet/model_configs.py``: ``Router``, ``Switch``, ``load_balanced_loss``), the MoE-ViT family
that OneS (Xue et al., "One Student Knows All Experts Know", arXiv 2201.10890) distils from. For
the T tokens of a call (every leading dimension flattened, in order):

    p_t        = softmax(W_r x_t)                          router, no bias (W_r: E x dim)
    E_t        = the top_k experts of p_t                  ties: the lower expert index
    pos(t, e)  = #{t' < t : e in E_t'}                     arrival order, counted before dropping
    kept(t, e) = e in E_t and pos(t, e) < C,  C = max(1, floor(capacity_factor * top_k * T / E))
    y_t        = sum_{e in E_t, kept(t, e)} p_t[e] * FFN_e(x_t),   FFN_e(x) = W2_e act(W1_e x + b1_e) + b2_e
    aux_loss   = E * sum_e f_e * P_e,   f_e = #{t : e in E_t} / (top_k * T),  P_e = mean_t p_t[e]

The gates are the router probabilities themselves (not renormalised over the top_k), a token every
one of whose experts is full gets y_t = 0 (the block's residual carries it), and ``aux_loss`` is
the Switch/WideNet load-balancing loss (1 at perfect balance; multiply it by a coefficient such
as 0.01 and add it to the training loss). Routing runs in float32 for half-precision inputs.

The reference path (:func:`moe_ref`, the specification) is vectorised: the tokens are gathered
into a capacity buffer (E, C, dim) with one ``index_select``, all experts run as two batched matrix
products on it, and the outputs are gathered back (no Python loop over tokens or experts, static
shapes, no host synchronisation).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ACTIVATIONS", "FeedForward", "MoE", "expert_capacity", "moe_ref"]

#: activation name -> (functional, module factory); "gelu" is the exact (erf) GELU of timm's Mlp
ACTIVATIONS: dict[str, tuple[Callable[[Tensor], Tensor], Callable[[], nn.Module]]] = {
    "gelu": (F.gelu, nn.GELU),
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), lambda: nn.GELU(approximate="tanh")),
    "relu": (F.relu, nn.ReLU),
    "silu": (F.silu, nn.SiLU),
}

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_positive_int(owner: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")


def _check_activation(owner: str, activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"{owner}: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")


def _activation_name(act: nn.Module) -> str:
    """The ACTIVATIONS name of an activation module (timm's Mlp, nn.Sequential FFNs, ...)."""
    if type(act) is nn.GELU:
        return "gelu" if act.approximate == "none" else "gelu_tanh"
    for name, (_, factory) in ACTIVATIONS.items():
        if name.startswith("gelu"):
            continue
        if type(act) is type(factory()):
            return name
    raise ValueError(
        f"unsupported activation module {type(act).__name__}; supported: nn.GELU, nn.ReLU, nn.SiLU"
    )


# --------------------------------------------------------------------------------------------
# Dense FFN
# --------------------------------------------------------------------------------------------


class FeedForward(nn.Module):
    """The transformer FFN ``fc2(act(fc1(x)))``: one expert of :class:`MoE`, and what
    :func:`effnn.gather_experts` returns.

    Parameter names are timm's ``Mlp`` (``fc1.weight``, ``fc1.bias``, ``fc2.weight``,
    ``fc2.bias``), so its state dict loads into a timm ViT block's ``mlp`` and back.

    Shape: (..., dim) -> (..., dim).

    Example::

        >>> ffn = FeedForward(384, 1536)
        >>> ffn(torch.randn(2, 197, 384)).shape
        torch.Size([2, 197, 384])
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        activation: str = "gelu",
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_positive_int("FeedForward", "dim", dim)
        _check_positive_int("FeedForward", "hidden_dim", hidden_dim)
        _check_activation("FeedForward", activation)
        self.activation = activation
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias, device=device, dtype=dtype)
        self.act = ACTIVATIONS[activation][1]()
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias, device=device, dtype=dtype)

    @property
    def dim(self) -> int:
        return self.fc1.in_features

    @property
    def hidden_dim(self) -> int:
        return self.fc1.out_features

    def reset_parameters(self) -> None:
        self.fc1.reset_parameters()
        self.fc2.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


# --------------------------------------------------------------------------------------------
# Reference path (the specification)
# --------------------------------------------------------------------------------------------


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Tokens each expert takes per call: ``max(1, floor(capacity_factor * top_k * T / E))``
    (WideNet's ``Switch.expert_capacity``; at least 1 so that a small batch is never dropped
    whole), 0 for an empty call. ``capacity_factor = E / top_k`` never drops a token."""
    if num_tokens == 0:
        return 0
    return max(1, math.floor(capacity_factor * top_k * num_tokens / num_experts))


def moe_ref(
    x: Tensor,
    router_weight: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Tensor | None,
    fc2_weight: Tensor,
    fc2_bias: Tensor | None,
    top_k: int,
    capacity: int,
    activation: str = "gelu",
    router_noise: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Reference forward for 2-D ``x`` (T, dim); returns (y (T, dim), aux_loss (scalar, fp32)).

    Shapes: ``router_weight`` (E, dim), ``fc1_weight`` (E, hidden, dim), ``fc1_bias`` (E, hidden),
    ``fc2_weight`` (E, dim, hidden), ``fc2_bias`` (E, dim); each expert's weights are laid out as
    ``nn.Linear``'s. ``capacity`` is tokens per expert (see :func:`expert_capacity`);
    ``router_noise`` (T, E), if given, is added to the router logits (WideNet's training noise).
    The routing (logits, softmax, top-k, positions) and ``aux_loss`` are computed in float32 for
    half-precision ``x`` (in ``x``'s dtype for float32 and float64).
    """
    T, dim = x.shape
    E = router_weight.shape[0]
    device = x.device
    route_dtype = torch.promote_types(x.dtype, torch.float32)  # fp16/bf16 route in fp32
    with torch.autocast(device.type, enabled=False):
        logits = F.linear(x.to(route_dtype), router_weight.to(route_dtype))
    if router_noise is not None:
        logits = logits + router_noise
    probs = logits.softmax(dim=-1)  # (T, E)
    # a stable sort instead of topk: ties go to the lower expert index on every device
    order = torch.sort(probs, dim=-1, descending=True, stable=True).indices
    expert = order[:, :top_k]  # (T, k)
    gate = probs.gather(1, expert)  # (T, k)
    routed = F.one_hot(expert, E).sum(1)  # (T, E): 1 where the token chose the expert
    # tokens before t routed to each expert (arrival order, counted before dropping)
    position = (routed.cumsum(0) - routed).gather(1, expert)  # (T, k)
    kept = position < capacity
    slot = expert * capacity + position  # (T, k), valid where kept

    # Dispatch: which token fills each of the E*C slots. Dropped assignments are written to one
    # extra dump slot that is cut off; empty slots read token 0 and their outputs are never
    # gathered (so they get no gradient either).
    token = torch.arange(T, device=device).repeat_interleave(top_k)
    token_of_slot = torch.zeros(E * capacity + 1, dtype=torch.long, device=device)
    token_of_slot.scatter_(0, torch.where(kept, slot, E * capacity).flatten(), token)
    x_in = x.index_select(0, token_of_slot[:-1]).view(E, capacity, dim)

    # All experts at once: two batched matmuls on the capacity buffer.
    act = ACTIVATIONS[activation][0]
    if fc1_bias is None:
        h = torch.bmm(x_in, fc1_weight.transpose(1, 2))
    else:
        h = torch.baddbmm(fc1_bias.unsqueeze(1), x_in, fc1_weight.transpose(1, 2))
    h = act(h)
    if fc2_bias is None:
        y = torch.bmm(h, fc2_weight.transpose(1, 2))
    else:
        y = torch.baddbmm(fc2_bias.unsqueeze(1), h, fc2_weight.transpose(1, 2))

    # Combine: each token's kept outputs, weighted by their router probabilities.
    picked = y.reshape(E * capacity, dim).index_select(0, torch.where(kept, slot, 0).flatten())
    picked = picked.view(T, top_k, dim) * gate.to(picked.dtype).unsqueeze(-1)
    out = torch.where(kept.unsqueeze(-1), picked, 0).sum(1)

    # Switch / WideNet load-balancing loss (fractions counted before dropping; 0 for T = 0)
    density = routed.to(probs.dtype).sum(0) / max(T * top_k, 1)
    mean_probs = probs.sum(0) / max(T, 1)
    aux_loss = E * (density * mean_probs).sum()
    return out, aux_loss


# --------------------------------------------------------------------------------------------
# Module
# --------------------------------------------------------------------------------------------


class MoE(nn.Module):
    r"""A sparse mixture of ``num_experts`` FFN experts with top-k routing, expert capacity and the
    load-balancing loss (Switch Transformer, V-MoE, WideNet: the MoE-ViT teachers of OneS, Xue et
    al., "One Student Knows All Experts Know: From Sparse to Dense", arXiv 2201.10890).

    Each token goes to the ``top_k`` experts with the largest router probability; its output is
    the sum of their outputs weighted by those probabilities. Each expert takes at most
    ``C = max(1, floor(capacity_factor * top_k * T / num_experts))`` of the T tokens of a call, in
    arrival order (all leading dimensions flattened); the assignments beyond C are dropped, and a
    token that loses all of them outputs 0. The exact equations are in :mod:`effnn.nn.moe`.
    Routing runs in float32 for half-precision inputs (under autocast too).

    After every forward, :attr:`aux_loss` holds the load-balancing loss of that call, a scalar
    tensor (float32, or float64 for float64 input) with gradient (1 when the load is perfectly
    balanced): add
    ``coefficient * moe.aux_loss`` (0.01 in the Switch Transformer) to the training loss.

    All experts' weights are stacked (below), so every parameter takes part in every forward,
    even an expert that received no token (its gradient is then zero): DDP works without
    ``find_unused_parameters``.

    Parameters (each expert laid out as ``nn.Linear``): ``router.weight`` (E, dim), ``fc1_weight``
    (E, hidden_dim, dim), ``fc1_bias`` (E, hidden_dim), ``fc2_weight`` (E, dim, hidden_dim),
    ``fc2_bias`` (E, dim). Each expert is initialised as ``nn.Linear`` would be.

    Args:
        dim: model width.
        hidden_dim: hidden width of each expert.
        num_experts: E.
        top_k: experts per token (1 in the Switch Transformer and WideNet's default, 2 in V-MoE).
        capacity_factor: slack of the expert capacity (1.0: exactly top_k*T/E tokens per expert;
            ``num_experts / top_k``: no token is ever dropped).
        activation: "gelu" (exact), "gelu_tanh", "relu" or "silu".
        bias: whether the experts' linears have biases (the router never has one).
        router_noise: standard deviation of the Gaussian noise added to the router logits in
            training mode (WideNet uses 1/num_experts); 0 disables it.
        device, dtype: as for ``nn.Linear``.

    Shape: input (..., dim), output (..., dim).

    Example::

        >>> moe = MoE(384, 1536, num_experts=8, top_k=2)
        >>> y = moe(torch.randn(4, 197, 384))            # (4, 197, 384)
        >>> loss = y.square().mean() + 0.01 * moe.aux_loss
        >>> ffn = effnn.gather_experts(moe, "svd")       # one dense FFN of the experts' shape
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        top_k: int = 1,
        capacity_factor: float = 1.0,
        activation: str = "gelu",
        bias: bool = True,
        router_noise: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("hidden_dim", hidden_dim), ("num_experts", num_experts),
                            ("top_k", top_k)):
            _check_positive_int("MoE", name, value)
        if top_k > num_experts:
            raise ValueError(f"MoE: top_k={top_k} is larger than num_experts={num_experts}")
        if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float)) or not (
            math.isfinite(capacity_factor) and capacity_factor > 0
        ):
            raise ValueError(f"MoE: capacity_factor must be a positive number, got {capacity_factor!r}")
        if isinstance(router_noise, bool) or not isinstance(router_noise, (int, float)) or not (
            math.isfinite(router_noise) and router_noise >= 0
        ):
            raise ValueError(f"MoE: router_noise must be a number >= 0, got {router_noise!r}")
        _check_activation("MoE", activation)
        self.dim = dim
        self.hidden_dim = hidden_dim
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = float(capacity_factor)
        self.activation = activation
        self.router_noise = float(router_noise)
        factory = {"device": device, "dtype": dtype}
        self.router = nn.Linear(dim, num_experts, bias=False, **factory)
        self.fc1_weight = nn.Parameter(torch.empty(num_experts, hidden_dim, dim, **factory))
        self.fc1_bias = nn.Parameter(torch.empty(num_experts, hidden_dim, **factory)) if bias else None
        self.fc2_weight = nn.Parameter(torch.empty(num_experts, dim, hidden_dim, **factory))
        self.fc2_bias = nn.Parameter(torch.empty(num_experts, dim, **factory)) if bias else None
        self.aux_loss: Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Router as ``nn.Linear``; every expert as a fresh ``nn.Linear`` pair (uniform with bound
        1/sqrt(fan_in) for weights and biases)."""
        self.router.reset_parameters()
        for weight, bias in ((self.fc1_weight, self.fc1_bias), (self.fc2_weight, self.fc2_bias)):
            bound = 1 / math.sqrt(weight.shape[2])
            nn.init.uniform_(weight, -bound, bound)
            if bias is not None:
                nn.init.uniform_(bias, -bound, bound)

    def capacity(self, num_tokens: int) -> int:
        """Tokens each expert takes in a call with ``num_tokens`` tokens."""
        return expert_capacity(num_tokens, self.num_experts, self.top_k, self.capacity_factor)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"MoE: input must be a Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.dim:
            raise ValueError(f"MoE: input must have shape (..., {self.dim}), got {tuple(x.shape)}")
        weight = self.fc1_weight
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"MoE: input must be a floating-point tensor (float16, bfloat16, float32 or float64), "
                f"got {x.dtype}"
            )
        if x.device != weight.device:
            raise ValueError(f"MoE: input is on {x.device} but the parameters are on {weight.device}")
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"MoE: input has dtype {x.dtype} but the parameters have dtype {weight.dtype}; "
                "cast one of them (or run under torch.autocast)"
            )
        x2d = x.reshape(-1, self.dim)
        T = x2d.shape[0]
        noise = None
        if self.training and self.router_noise > 0:
            noise = torch.randn(T, self.num_experts, device=x.device) * self.router_noise
        y, self.aux_loss = moe_ref(
            x2d, self.router.weight, self.fc1_weight, self.fc1_bias, self.fc2_weight,
            self.fc2_bias, self.top_k, self.capacity(T), self.activation, noise,
        )
        return y if x.dim() == 2 else y.view(x.shape[:-1] + (y.shape[-1],))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, hidden_dim={self.hidden_dim}, num_experts={self.num_experts}, "
            f"top_k={self.top_k}, capacity_factor={self.capacity_factor}, "
            f"activation={self.activation!r}, bias={self.fc1_bias is not None}"
            + (f", router_noise={self.router_noise}" if self.router_noise else "")
        )

    def __getstate__(self) -> dict:
        # the last aux_loss is part of a graph (not copyable, not picklable): never serialise it
        state = self.__dict__.copy()
        state["aux_loss"] = None
        return state

    # ---- conversions ------------------------------------------------------------------------

    def expert(self, index: int) -> FeedForward:
        """Expert ``index`` as a standalone :class:`FeedForward` (a copy of its weights)."""
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.num_experts:
            raise ValueError(f"MoE.expert: index must be an int in [0, {self.num_experts}), got {index!r}")
        weight = self.fc1_weight
        ffn = FeedForward(self.dim, self.hidden_dim, self.activation, self.fc1_bias is not None,
                          device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            ffn.fc1.weight.copy_(self.fc1_weight[index])
            ffn.fc2.weight.copy_(self.fc2_weight[index])
            if self.fc1_bias is not None:
                ffn.fc1.bias.copy_(self.fc1_bias[index])
                ffn.fc2.bias.copy_(self.fc2_bias[index])
        return ffn

    @classmethod
    def from_ffn(
        cls,
        ffn: nn.Module,
        num_experts: int,
        top_k: int = 1,
        capacity_factor: float = 1.0,
        router_noise: float = 0.0,
    ) -> MoE:
        """An MoE whose every expert is a copy of a dense FFN (sparse upcycling), with a fresh
        router, on the FFN's device and dtype.

        ``ffn`` is any module with ``fc1`` and ``fc2`` (``nn.Linear``) and an ``act`` of nn.GELU,
        nn.ReLU or nn.SiLU: :class:`FeedForward`, timm's ``Mlp``, ``effnn.models`` ViT MLPs.
        ``gather_experts(MoE.from_ffn(f, E), "avg")`` gives back ``f`` exactly.
        """
        fc1, fc2, act = (getattr(ffn, name, None) for name in ("fc1", "fc2", "act"))
        if not (isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear) and isinstance(act, nn.Module)):
            raise TypeError(
                "MoE.from_ffn: ffn must have nn.Linear attributes fc1 and fc2 and an activation "
                f"module act (as timm's Mlp), got {type(ffn).__name__}"
            )
        if fc2.in_features != fc1.out_features or fc2.out_features != fc1.in_features:
            raise ValueError(
                f"MoE.from_ffn: fc1 ({fc1.in_features} -> {fc1.out_features}) and fc2 "
                f"({fc2.in_features} -> {fc2.out_features}) do not form a dim -> hidden -> dim FFN"
            )
        if (fc1.bias is None) != (fc2.bias is None):
            raise ValueError("MoE.from_ffn: fc1 and fc2 must both have a bias or both have none")
        moe = cls(
            fc1.in_features, fc1.out_features, num_experts, top_k, capacity_factor,
            _activation_name(act), fc1.bias is not None, router_noise,
            device=fc1.weight.device, dtype=fc1.weight.dtype,
        )
        with torch.no_grad():
            moe.fc1_weight.copy_(fc1.weight.expand_as(moe.fc1_weight))
            moe.fc2_weight.copy_(fc2.weight.expand_as(moe.fc2_weight))
            if fc1.bias is not None:
                moe.fc1_bias.copy_(fc1.bias.expand_as(moe.fc1_bias))
                moe.fc2_bias.copy_(fc2.bias.expand_as(moe.fc2_bias))
        return moe
