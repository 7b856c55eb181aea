"""Mixture-of-Depths (Raposo et al., 2024) and gamma-MoD (Luo et al., ICLR 2025) modules.

- :class:`MoDBlock` wraps a transformer block that returns x + f(x) and routes only the top-k
  tokens of every sequence through it: x_i + r_i * f(X~)_i for routed tokens, x_i for the others.
- :class:`MoDRouter` is the paper's router r = w^T x; :class:`GammaRouter` is gamma-MoD's two-way
  router (one instance may be shared by several blocks, as gamma-MoD's shared vision-language
  router); :class:`MoDPredictor` is the small stop-gradient MLP of the paper's section 3.5.
- :meth:`MoDBlock.decode` is the sampling-time path: every token decides by itself (causally)
  whether it is processed, and a :class:`KVCache` keeps, per sequence, the keys and values of
  exactly the tokens this block processed.
- :class:`PreNormBlock` is a standard pre-norm transformer block (GPT-2/ViT layout, optional
  rotary positions) that implements the cache protocol :meth:`MoDBlock.decode` needs.
- :func:`mod_aux_loss` sums the auxiliary losses of a model's MoD blocks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effnn.ops.mod import (
    check_capacity,
    mod_capacity,
    mod_gather,
    mod_scatter,
    mod_topk,
    mod_update,
    routing_loss,
    topk_targets,
)

__all__ = [
    "MoDBlock",
    "MoDRouter",
    "GammaRouter",
    "MoDPredictor",
    "PreNormBlock",
    "KVCache",
    "mod_aux_loss",
]

SAMPLING = (None, "router", "predictor")


def _check_dim(dim: Any, where: str, name: str = "dim") -> None:
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"{where}: {name} must be a positive int, got {dim!r}")


def _linear_fp32(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ weight.T (+ bias) in float32 whatever the dtypes and any ambient autocast: routing
    decisions are computed in float32."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))


class MoDRouter(nn.Module):
    r"""The Mixture-of-Depths router: a scalar per token, :math:`r_i = w_\theta^T x_i` (section
    3.4 of the paper, no bias), which is both the score the top-k ranks and the weight that
    multiplies the block's branch. Computed in float32.

    Parameter ``weight`` (1, dim). ``forward(x)`` for x (..., dim) returns (logit, weight), both
    (...,) float32 and here equal: the logit is what the auxiliary loss of section 3.5 reads.
    """

    def __init__(self, dim: int, device=None, dtype=None) -> None:
        super().__init__()
        _check_dim(dim, "MoDRouter")
        self.dim = dim
        self.weight = nn.Parameter(torch.empty(1, dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default: uniform with bound 1/sqrt(dim)
        bound = 1 / math.sqrt(self.dim)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logit = _linear_fp32(x, self.weight).squeeze(-1)
        return logit, logit

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class GammaRouter(nn.Module):
    r"""gamma-MoD's router: ``nn.Linear(dim, 2, bias=False)`` and the probability
    :math:`p_i = \mathrm{softmax}(W x_i)_1` of the "keep" class as the token's weight
    (Yaxin9Luo/Gamma-MOD, ``gamma_mod/model/language_model/llava_llama_mod.py``, the MoD layer
    forward). One instance passed to several :class:`MoDBlock` s is gamma-MoD's shared
    vision-language router.

    Parameter ``weight`` (2, dim), the layout of the official ``router.weight``. ``forward(x)``
    returns (logit, weight), (...,) float32: logit = l1 - l0, so that sigmoid(logit) = p, the
    top-k ranks by logit (the same order as by p) and the two-class cross-entropy of the official
    routing loss equals the binary cross-entropy of this logit.
    """

    def __init__(self, dim: int, device=None, dtype=None) -> None:
        super().__init__()
        _check_dim(dim, "GammaRouter")
        self.dim = dim
        self.weight = nn.Parameter(torch.empty(2, dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1 / math.sqrt(self.dim)  # nn.Linear's default, as in the LLaVA-HR version
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logits = _linear_fp32(x, self.weight)
        logit = logits[..., 1] - logits[..., 0]
        return logit, torch.sigmoid(logit)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class MoDPredictor(nn.Module):
    """The small auxiliary MLP of the paper's section 3.5 that predicts, from the router's input
    (under a stop gradient, applied by :class:`MoDBlock`), whether a token will be in the top-k:
    ``fc2(gelu(fc1(x)))``, one logit per token, in float32. The paper says only "small"; the
    hidden width defaults to dim // 2.
    """

    def __init__(self, dim: int, hidden: int | None = None, device=None, dtype=None) -> None:
        super().__init__()
        _check_dim(dim, "MoDPredictor")
        hidden = max(1, dim // 2) if hidden is None else hidden
        _check_dim(hidden, "MoDPredictor", "hidden")
        self.fc1 = nn.Linear(dim, hidden, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden, 1, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        h = F.gelu(_linear_fp32(x, self.fc1.weight, self.fc1.bias))
        return _linear_fp32(h, self.fc2.weight, self.fc2.bias).squeeze(-1)


# ------------------------------------------------------------------------------------------------
# KV cache and the standard pre-norm block
# ------------------------------------------------------------------------------------------------


class KVCache:
    """Keys and values of one attention layer for a batch of sequences of different lengths.

    MoD lets every sequence skip different tokens, so each sequence has its own cache length
    ``length[b]``: the number of tokens this layer has processed in sequence b. ``seen[b]`` counts
    every token offered to the layer (processed or skipped); :meth:`MoDBlock.decode` keeps it, to
    know the absolute index of a new token.

    :meth:`append` writes the new keys and values of some sequences after their cached ones and
    returns everything they may attend to, with the causal mask in processing order.
    """

    def __init__(self, batch_size: int) -> None:
        _check_dim(batch_size, "KVCache", "batch_size")
        self.batch_size = batch_size
        self.keys: Tensor | None = None  # (B, H, capacity, head_dim)
        self.values: Tensor | None = None
        self.length = torch.zeros(batch_size, dtype=torch.long)
        self.seen = torch.zeros(batch_size, dtype=torch.long)

    def append(
        self, k: Tensor, v: Tensor, rows: Tensor | None = None, valid: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Append keys and values ``k``, ``v`` (n, H, m, head_dim) of batch rows ``rows`` (n,)
        (default: every row); only tokens with ``valid`` (n, m) True are stored (default: all).

        Returns (keys, values, mask): (n, H, L, head_dim) and the boolean attention mask
        (n, 1, m, L), True where new query j may attend cache slot s: s at or before its own slot.
        A query that is not valid may attend every slot of its row (its output is discarded).
        """
        n, H, m, dh = k.shape
        if rows is None:
            if n != self.batch_size:
                raise ValueError(f"KVCache.append: expected {self.batch_size} rows, got {n}")
            rows = torch.arange(n)
        if valid is None:
            valid = torch.ones(n, m, dtype=torch.bool)
        device = k.device
        self.length = self.length.to(device)
        self.seen = self.seen.to(device)
        rows, valid = rows.to(device), valid.to(device)
        start = self.length[rows]  # (n,)
        slot = start.unsqueeze(1) + valid.long().cumsum(1) - 1  # (n, m): slot of valid tokens
        new_length = start + valid.sum(1)
        needed = int(new_length.max()) if n else 0
        self._reserve(needed, H, dh, k.dtype, device)
        r_idx = rows.unsqueeze(1).expand(n, m)[valid]
        s_idx = slot[valid]
        self.keys[r_idx, :, s_idx] = k.transpose(1, 2)[valid]
        self.values[r_idx, :, s_idx] = v.transpose(1, 2)[valid]
        self.length[rows] = new_length
        limit = torch.where(valid, slot, (new_length - 1).unsqueeze(1))
        mask = torch.arange(needed, device=device) <= limit.unsqueeze(-1)  # (n, m, L)
        return self.keys[rows, :, :needed], self.values[rows, :, :needed], mask.unsqueeze(1)

    def _reserve(self, needed: int, heads: int, head_dim: int, dtype, device) -> None:
        have = 0 if self.keys is None else self.keys.shape[2]
        if needed <= have:
            return
        size = max(needed, 2 * have, 16)  # doubling: amortised O(1) copies per token
        shape = (self.batch_size, heads, size, head_dim)
        keys = torch.zeros(shape, dtype=dtype, device=device)
        values = torch.zeros(shape, dtype=dtype, device=device)
        if self.keys is not None:
            keys[:, :, :have] = self.keys
            values[:, :, :have] = self.values
        self.keys, self.values = keys, values


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class PreNormBlock(nn.Module):
    """A standard pre-norm transformer block: x + attn(LN(x)), then + mlp(LN(.)).

    Multi-head self-attention (one fused qkv projection, ``scaled_dot_product_attention``),
    causal or not, with optional rotary position embeddings (``rope=True``; rotate-half layout,
    base 10000) at the given token ``positions``; a GELU MLP of ``mlp_ratio * dim`` hidden units.

    ``forward(x, positions=None, *, cache=None, cache_rows=None, valid=None)``: x (B, T, dim);
    ``positions`` (B, T) or (1, T) integer positions for rope (default 0..T-1). With a
    :class:`KVCache` (causal blocks only) the new tokens attend to the cached ones: ``cache_rows``
    are the batch rows of ``x`` in the cache (default all) and ``valid`` (B, T) marks the real
    tokens (the others are padding: neither cached nor attended). This is the protocol
    :meth:`MoDBlock.decode` uses.

    Example::

        >>> block = PreNormBlock(768, 12, causal=True)
        >>> block(torch.randn(2, 128, 768)).shape
        torch.Size([2, 128, 768])
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        *,
        causal: bool = True,
        rope: bool = False,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        _check_dim(dim, "PreNormBlock")
        _check_dim(num_heads, "PreNormBlock", "num_heads")
        if dim % num_heads:
            raise ValueError(f"PreNormBlock: dim={dim} is not divisible by num_heads={num_heads}")
        if rope and (dim // num_heads) % 2:
            raise ValueError(f"PreNormBlock: rope needs an even head dim, got {dim // num_heads}")
        hidden = int(mlp_ratio * dim)
        _check_dim(hidden, "PreNormBlock", "mlp_ratio * dim")
        factory = {"device": device, "dtype": dtype}
        self.dim, self.num_heads, self.causal, self.rope = dim, num_heads, causal, rope
        self.head_dim = dim // num_heads
        self.norm1 = nn.LayerNorm(dim, **factory)
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias, **factory)
        self.proj = nn.Linear(dim, dim, bias=bias, **factory)
        self.norm2 = nn.LayerNorm(dim, **factory)
        self.fc1 = nn.Linear(dim, hidden, bias=bias, **factory)
        self.fc2 = nn.Linear(hidden, dim, bias=bias, **factory)

    def _rotary(self, t: Tensor, positions: Tensor) -> Tensor:
        """Rotate (B, H, T, head_dim) by the angles of ``positions`` (B, T)."""
        half = self.head_dim // 2
        dtype = torch.promote_types(t.dtype, torch.float32)  # angles in float32 at least
        inv_freq = 10000.0 ** (-torch.arange(half, device=t.device, dtype=dtype) / half)
        angles = positions.to(dtype).unsqueeze(-1) * inv_freq  # (B, T, half)
        angles = torch.cat((angles, angles), dim=-1).unsqueeze(1)  # (B, 1, T, head_dim)
        cos, sin = angles.cos().to(t.dtype), angles.sin().to(t.dtype)
        return t * cos + _rotate_half(t) * sin

    def forward(
        self,
        x: Tensor,
        positions: Tensor | None = None,
        *,
        cache: KVCache | None = None,
        cache_rows: Tensor | None = None,
        valid: Tensor | None = None,
    ) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"PreNormBlock: x must have shape (B, T, {self.dim}), got {tuple(x.shape)}")
        if cache is None and (cache_rows is not None or valid is not None):
            raise ValueError("PreNormBlock: cache_rows and valid are only meaningful with a cache")
        if cache is not None and not self.causal:
            raise ValueError("PreNormBlock: a KV cache needs a causal block (causal=True)")
        B, T, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.rope:
            if positions is None and cache is not None:
                raise ValueError("PreNormBlock: with a cache and rope, pass the absolute positions")
            if positions is None:
                positions = torch.arange(T, device=x.device).unsqueeze(0)
            positions = positions.expand(B, T)
            q, k = self._rotary(q, positions), self._rotary(k, positions)
        if cache is None:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal and T > 1)
        else:
            keys, values, mask = cache.append(k, v, cache_rows, valid)
            a = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, self.dim))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, hidden={self.fc1.out_features}, "
                f"causal={self.causal}, rope={self.rope}")


# ------------------------------------------------------------------------------------------------
# MoDBlock
# ------------------------------------------------------------------------------------------------


def _gather_tokens(value: Any, dims: Sequence[int], rows: Tensor | None, idx: Tensor, tokens: int,
                   name: str) -> Any:
    """Index a token-aligned block argument by the routed positions.

    ``value``: a tensor whose dim 0 is the batch (size B or 1) and whose ``dims`` run over the T
    tokens (size T, or 1 to broadcast), or a tuple/list of such tensors (rotary cos/sin), or None.
    ``rows`` (n,) selects batch rows (None: all), ``idx`` (n, k) the positions in each row.
    """
    if value is None:
        return None
    if isinstance(value, (tuple, list)):
        return type(value)(_gather_tokens(v, dims, rows, idx, tokens, name) for v in value)
    if not isinstance(value, Tensor):
        raise TypeError(f"MoDBlock: token argument {name!r} must be a Tensor (or a tuple of them), "
                        f"got {type(value).__name__}")
    t = value
    if rows is not None and t.shape[0] != 1:
        t = t.index_select(0, rows)
    n, k = idx.shape
    if t.shape[0] not in (1, n):
        raise ValueError(f"MoDBlock: token argument {name!r} has batch size {t.shape[0]}, expected "
                         f"{n} or 1")
    t = t.expand(n, *t.shape[1:])
    for d in dims:
        if t.shape[d] == 1:
            continue  # broadcast over the tokens
        if t.shape[d] != tokens:
            raise ValueError(f"MoDBlock: token argument {name!r} has size {t.shape[d]} in dim {d}, "
                             f"expected {tokens} (the sequence length) or 1")
        view = [1] * t.dim()
        view[0], view[d] = n, k
        size = list(t.shape)
        size[d] = k
        t = torch.gather(t, d, idx.view(view).expand(size))
    return t


class MoDBlock(nn.Module):
    r"""Mixture-of-Depths (Raposo et al., "Mixture-of-Depths: Dynamically allocating compute in
    transformer-based language models", arXiv 2404.02258, 2024) around any transformer block.

    ``block(x)`` must return x + f(x) (a pre-norm residual block; for other blocks f is taken as
    block(x) - x). Per sequence, the router scores every token, the k = ceil(capacity * T) tokens
    with the largest scores (ties: the earlier token, decided in float32) go through the block in
    their original order, and

    .. math:: x_i \leftarrow x_i + r_i\, f(\tilde X)_i \ \text{(routed)}, \qquad x_i \leftarrow x_i \ \text{(others)}

    where :math:`\tilde X` is the routed subset and :math:`r_i` the router weight: only the branch
    is scaled, never the residual (paper, section 3.4). Token-aligned block arguments named in
    ``token_args`` (attention masks, position ids, rotary cos/sin) are indexed by the routed
    positions, so masks stay exact and positions stay the original ones.

    Args:
        block: the wrapped block, called as ``block(x_routed, *args, **kwargs)``.
        dim: model width (the last dim of x).
        capacity: fraction of the tokens routed, in (0, 1]; the paper's best is 0.125.
        router: a :class:`MoDRouter` (default, the paper's) or :class:`GammaRouter`; pass one
            instance to several blocks to share it (gamma-MoD).
        sampling: how causal decisions are made at sampling time (paper, section 3.5):
            ``"router"``: by the router itself, sigmoid(logit) > 0.5, trained by the auxiliary
            binary cross-entropy on top-k membership (also gamma-MoD's routing loss);
            ``"predictor"``: by a small MLP (:class:`MoDPredictor`) on the router's input under a
            stop gradient, trained by the same loss; None: no auxiliary loss, no :meth:`decode`.
        predictor_hidden: hidden width of the predictor (default dim // 2).
        keep_first: the first ``keep_first`` tokens of every sequence are always routed (e.g. a
            ViT's class token); they count within k.
        router_norm: name of a submodule of ``block`` applied to x before the router and the
            predictor (gamma-MoD routes on the layer's own input norm), or None (the paper: the
            raw residual stream).
        token_args: block arguments indexed by token: ``{name or position in *args: dims}``,
            dims of the argument (dim 0 is the batch) that run over the tokens. Default:
            ``{"positions": (1,)}`` for :class:`PreNormBlock`, else nothing.

    In training mode with ``sampling`` set, each forward stores its auxiliary loss in
    ``self.aux_loss``; add :func:`mod_aux_loss` (model) to the training loss. Under DDP the
    predictor is trained only through that loss: without it, use ``find_unused_parameters=True``.

    Shape: x (B, T, dim) -> (B, T, dim). ``keep_mask`` (B, T) bool: tokens always routed
    (gamma-MoD's masked routing learning); they count within k.

    Example::

        >>> block = PreNormBlock(768, 12, causal=True)
        >>> mod = MoDBlock(block, 768, capacity=0.125, sampling="router")
        >>> y = mod(torch.randn(2, 2048, 768))   # 256 tokens per sequence go through the block
        >>> loss = lm_loss(y) + 0.01 * mod_aux_loss(model)
    """

    def __init__(
        self,
        block: nn.Module,
        dim: int,
        capacity: float = 0.125,
        *,
        router: nn.Module | None = None,
        sampling: str | None = None,
        predictor_hidden: int | None = None,
        keep_first: int = 0,
        router_norm: str | None = None,
        token_args: Mapping[int | str, Sequence[int]] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(block, nn.Module):
            raise TypeError(f"MoDBlock: block must be an nn.Module, got {type(block).__name__}")
        _check_dim(dim, "MoDBlock")
        check_capacity(capacity, "MoDBlock")
        if sampling not in SAMPLING:
            raise ValueError(f"MoDBlock: sampling must be one of {SAMPLING}, got {sampling!r}")
        if isinstance(keep_first, bool) or not isinstance(keep_first, int) or keep_first < 0:
            raise ValueError(f"MoDBlock: keep_first must be an int >= 0, got {keep_first!r}")
        if router_norm is not None:
            try:
                block.get_submodule(router_norm)
            except AttributeError:
                raise ValueError(f"MoDBlock: router_norm={router_norm!r} is not a submodule of the "
                                 f"{type(block).__name__}") from None
        ref = next(block.parameters(), None)
        factory = {"device": None, "dtype": None} if ref is None else {"device": ref.device, "dtype": ref.dtype}
        if router is None:
            router = MoDRouter(dim, **factory)
        if not isinstance(router, (MoDRouter, GammaRouter)):
            raise TypeError(f"MoDBlock: router must be a MoDRouter or GammaRouter, got {type(router).__name__}")
        if router.dim != dim:
            raise ValueError(f"MoDBlock: router has dim {router.dim}, expected dim={dim}")
        if token_args is None:
            token_args = {"positions": (1,)} if isinstance(block, PreNormBlock) else {}
        self.block = block
        self.router = router
        self.predictor = MoDPredictor(dim, predictor_hidden, **factory) if sampling == "predictor" else None
        self.dim = dim
        self.capacity = float(capacity)
        self.sampling = sampling
        self.keep_first = keep_first
        self.router_norm = router_norm
        self.token_args = {key: tuple(dims) for key, dims in token_args.items()}
        self.aux_loss: Tensor | None = None

    def __getstate__(self) -> dict:
        # the stored auxiliary loss is part of an autograd graph: copies and pickles drop it
        state = self.__dict__.copy()
        state["aux_loss"] = None
        return state

    # ---- helpers ------------------------------------------------------------------------------

    def _router_input(self, x: Tensor) -> Tensor:
        return x if self.router_norm is None else self.block.get_submodule(self.router_norm)(x)

    def _check_x(self, x: Tensor, keep_mask: Tensor | None) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"MoDBlock: x must be a Tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"MoDBlock: x must have shape (B, T, {self.dim}), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"MoDBlock: x must be floating point, got {x.dtype}")
        if keep_mask is not None:
            if not isinstance(keep_mask, Tensor) or keep_mask.dtype != torch.bool:
                raise TypeError("MoDBlock: keep_mask must be a bool Tensor, got "
                                f"{getattr(keep_mask, 'dtype', type(keep_mask).__name__)}")
            if tuple(keep_mask.shape) != tuple(x.shape[:2]):
                raise ValueError(f"MoDBlock: keep_mask must have shape {tuple(x.shape[:2])}, "
                                 f"got {tuple(keep_mask.shape)}")
            if keep_mask.device != x.device:
                raise ValueError(f"MoDBlock: keep_mask is on {keep_mask.device} but x is on {x.device}")

    def _token_call(self, x_sel: Tensor, rows: Tensor | None, idx: Tensor, tokens: int,
                    args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        args = list(args)
        for key, dims in self.token_args.items():
            if isinstance(key, int):
                if key < len(args):
                    args[key] = _gather_tokens(args[key], dims, rows, idx, tokens, f"args[{key}]")
            elif key in kwargs:
                kwargs[key] = _gather_tokens(kwargs[key], dims, rows, idx, tokens, key)
        return tuple(args), kwargs

    # ---- routing ------------------------------------------------------------------------------

    def route(self, x: Tensor, keep_mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Training-time (top-k) routing of x (B, T, dim): (positions (B, k) ascending, router
        logits (B, T) float32, router weights (B, T) float32)."""
        logit, weight = self.router(self._router_input(x))
        k = mod_capacity(x.shape[1], self.capacity)
        return mod_topk(logit, k, keep_mask, self.keep_first), logit, weight

    def decide(self, x: Tensor, keep_mask: Tensor | None = None, offset: Tensor | int = 0) -> Tensor:
        """Sampling-time decisions (B, T) bool: each token on its own, causally. ``offset`` (B,)
        or int: absolute index of the first token of x (for ``keep_first``)."""
        return self._decide(x, keep_mask, offset)[0]

    def _decide(self, x: Tensor, keep_mask: Tensor | None, offset: Tensor | int) -> tuple[Tensor, Tensor]:
        """(decisions (B, T) bool, router weights (B, T) float32)."""
        if self.sampling is None:
            raise ValueError("MoDBlock: causal decisions need sampling='router' or 'predictor' "
                             "(the top-k of the forward looks at the whole sequence)")
        h = self._router_input(x)
        logit, weight = self.router(h)
        if self.sampling == "predictor":
            logit = self.predictor(h)
        routed = logit > 0  # sigmoid(logit) > 0.5
        if keep_mask is not None:
            routed = routed | keep_mask
        if self.keep_first:
            position = torch.as_tensor(offset, device=x.device).view(-1, 1) + torch.arange(
                x.shape[1], device=x.device)
            routed = routed | (position < self.keep_first)
        return routed, weight

    def forward(self, x: Tensor, *args: Any, keep_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        self._check_x(x, keep_mask)
        B, T, _ = x.shape
        if B == 0 or T == 0:
            return x.clone()
        idx, logit, weight = self.route(x, keep_mask)
        x_sel = mod_gather(x, idx)
        args, kwargs = self._token_call(x_sel, None, idx, T, args, kwargs)
        out_sel = self._run_block(x_sel, args, kwargs)
        y = mod_scatter(x, idx, mod_update(x_sel, out_sel, torch.gather(weight, 1, idx)))
        if self.training and self.sampling is not None:
            targets = topk_targets(idx, T)
            if self.sampling == "router":
                self.aux_loss = routing_loss(logit, targets)
            else:  # the predictor sees the router's input under a stop gradient
                self.aux_loss = routing_loss(self.predictor(self._router_input(x).detach()), targets)
        return y

    def _run_block(self, x_sel: Tensor, args: tuple, kwargs: dict) -> Tensor:
        return self.block(x_sel, *args, **kwargs)

    @torch.no_grad()
    def decode(self, x: Tensor, cache: KVCache, *args: Any, keep_mask: Tensor | None = None,
               **kwargs: Any) -> Tensor:
        """Sampling-time forward of new tokens x (B, m, dim) (a prompt, or one token per step).

        Each token is processed iff :meth:`decide` says so (causal: it depends on that token
        only); the processed tokens of each sequence go through the block together, attending to
        this block's ``cache`` (:class:`KVCache`), which then holds their keys and values. Skipped
        tokens leave nothing in the cache, exactly as in training, where a token outside the top-k
        gives no keys or values at this block. Processing a prompt at once or token by token gives
        the same result. The block must accept the keyword arguments ``cache``, ``cache_rows``
        and ``valid`` (:class:`PreNormBlock` does); token arguments (e.g. ``positions`` (B, m),
        absolute) are indexed like in :meth:`forward`.
        """
        self._check_x(x, keep_mask)
        if not isinstance(cache, KVCache) or cache.batch_size != x.shape[0]:
            raise ValueError(f"MoDBlock.decode: cache must be a KVCache of batch size {x.shape[0]}")
        B, m, _ = x.shape
        routed, weight = self._decide(x, keep_mask, cache.seen.to(x.device))
        cache.seen = cache.seen.to(x.device) + m
        counts = routed.sum(1)
        rows = counts.nonzero().squeeze(1)
        if rows.numel() == 0:
            return x.clone()
        n_max = int(counts.max())
        # routed positions of each row first, in order; then padding slots
        order = torch.sort((~routed[rows]).to(torch.uint8), dim=1, stable=True).indices[:, :n_max]
        valid = torch.arange(n_max, device=x.device) < counts[rows].unsqueeze(1)
        x_sel = x[rows.unsqueeze(1), order]
        args, kwargs = self._token_call(x_sel, rows, order, m, args, kwargs)
        out_sel = self.block(x_sel, *args, cache=cache, cache_rows=rows, valid=valid, **kwargs)
        y_sel = mod_update(x_sel, out_sel, weight[rows.unsqueeze(1), order])
        y = x.clone()
        y[rows.unsqueeze(1).expand_as(order)[valid], order[valid]] = y_sel[valid]
        return y

    def extra_repr(self) -> str:
        parts = [f"dim={self.dim}", f"capacity={self.capacity}", f"sampling={self.sampling!r}"]
        if self.keep_first:
            parts.append(f"keep_first={self.keep_first}")
        if self.router_norm is not None:
            parts.append(f"router_norm={self.router_norm!r}")
        return ", ".join(parts)


def mod_aux_loss(model: nn.Module) -> Tensor:
    """The sum of the auxiliary losses stored by the last training-mode forward of every
    :class:`MoDBlock` in ``model`` (each is then cleared, so no graph outlives its step).

    gamma-MoD multiplies this sum by 0.01 (``router_aux_loss_coef``) before adding it to the LM
    loss; the MoD paper gives no coefficient.
    """
    blocks = [m for m in model.modules() if isinstance(m, MoDBlock) and m.sampling is not None]
    if not blocks:
        raise ValueError("mod_aux_loss: model has no MoDBlock with sampling='router' or 'predictor'")
    losses = [m.aux_loss for m in blocks if m.aux_loss is not None]
    if not losses:
        raise ValueError("mod_aux_loss: no auxiliary loss stored; run a forward in training mode first")
    for m in blocks:
        m.aux_loss = None
    return torch.stack(losses).sum()
