"""Convert blocks of existing models to Mixture-of-Depths, and choose them by ARank (gamma-MoD).

- :func:`to_mod` wraps chosen blocks of a model in :class:`effnn.MoDBlock`, in place: HF
  transformers GPT-2, BERT (and BERT-like encoders such as all-MiniLM-L6-v2), Llama-style decoders
  (rotary positions), timm Vision Transformers, and stacks of :class:`effnn.nn.PreNormBlock`.
- :func:`arank` measures gamma-MoD's ARank, the rank of every layer's attention maps, with an
  explicit tolerance; :func:`attention_rank` does it for maps you already have;
  :func:`select_mod_layers` is gamma-MoD's rule that picks the layers to convert from it.

gamma-MoD (Luo et al., "gamma-MoD: Exploring Mixture-of-Depth Adaptation for Multimodal Large
Language Models", ICLR 2025, arXiv 2410.13859); official code Yaxin9Luo/Gamma-MOD.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from effnn.nn.mod import GammaRouter, MoDBlock, MoDRouter, PreNormBlock
from effnn.ops.mod import check_capacity

__all__ = ["to_mod", "arank", "attention_rank", "select_mod_layers", "HFMoDBlock"]

ROUTERS = ("mod", "gamma")


# ------------------------------------------------------------------------------------------------
# Block families
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Family:
    """How one kind of block is called, and what MoDBlock must index or refuse."""

    token_args: dict  # {position in *args or keyword: token dims}
    router_norm: str | None  # the block's input norm (gamma-MoD routes on it), None for post-norm
    cache_args: tuple = ()  # transformers KV-cache arguments (positions in *args or keywords)


_MASK = (2, 3)  # (B, 1, T, T) attention masks: query and key dims
_GPT2 = _Family({1: _MASK, "attention_mask": _MASK, "position_ids": (1,)}, "ln_1",
                (0, "cache", "past_key_values"))
_BERT = _Family({0: _MASK, "attention_mask": _MASK, "position_ids": (1,)}, None,
                ("cache", "past_key_values"))
_LLAMA = _Family({"attention_mask": _MASK, "position_ids": (1,), "position_embeddings": (1,)},
                 "input_layernorm", ("cache", "past_key_values"))
_TIMM = _Family({"attn_mask": _MASK}, "norm1")
_PRENORM = _Family({"positions": (1,)}, "norm1")

# transformers decoder layers with Llama's call (keyword mask, position ids and rotary cos/sin)
_LLAMA_LIKE = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")


def _family(block: nn.Module) -> _Family | None:
    name = type(block).__name__
    module = type(block).__module__
    if isinstance(block, PreNormBlock):
        return _PRENORM
    if module.startswith("transformers."):
        if name == "GPT2Block":
            return _GPT2
        if name == "BertLayer":
            return _BERT
        if name in _LLAMA_LIKE:
            return _LLAMA
    if module.startswith("timm.") and hasattr(block, "attn") and hasattr(block, "norm1"):
        return _TIMM
    return None


_BLOCK_PATHS = ("transformer.h", "h", "bert.encoder.layer", "encoder.layer", "model.layers",
                "layers", "blocks")


def _find_blocks(model: nn.Module, path: str | None) -> tuple[str, nn.ModuleList]:
    paths = (path,) if path is not None else _BLOCK_PATHS
    for p in paths:
        try:
            blocks = model.get_submodule(p)
        except AttributeError:
            continue
        if isinstance(blocks, (nn.ModuleList, nn.Sequential)) and len(blocks) > 0:
            return p, blocks
    if path is not None:
        raise ValueError(f"to_mod: model has no non-empty ModuleList at blocks={path!r}")
    raise ValueError(f"to_mod: found no list of blocks in {type(model).__name__} (looked at "
                     f"{', '.join(_BLOCK_PATHS)}); pass blocks='path.to.ModuleList'")


class HFMoDBlock(MoDBlock):
    """A :class:`MoDBlock` around a transformers layer.

    - The transformers KV cache (``cache`` / ``past_key_values``) cannot follow MoD: every
      sequence skips different tokens, so its cache length differs per sequence. A converted
      layer refuses a cache instead of corrupting it; :func:`to_mod` sets
      ``config.use_cache = False``.
    - transformers (5.x) collects ``output_hidden_states`` with forward hooks on its layer
      classes. The wrapped layer runs without its own hooks, and its forward hooks are then called
      with the wrapper's full input and output, so that they see the layer's result for every
      token, not the routed subset. (Forward pre-hooks of the wrapped layer are not called: put
      hooks, and FSDP's ``fully_shard``, on the wrapper.)
    """

    def __init__(self, *args: Any, cache_args: Sequence[int | str] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cache_args = tuple(cache_args)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        for key in self.cache_args:
            if isinstance(key, int):
                value = args[key] if key < len(args) else None
            else:
                value = kwargs.get(key)
            if value is not None:
                raise NotImplementedError(
                    "MoD layers converted by effnn.to_mod cannot use the transformers KV cache "
                    "(each sequence skips different tokens, so its cache length differs): call the "
                    "model with use_cache=False. Cached decoding: MoDBlock.decode with a KVCache."
                )
        y = super().forward(x, *args, **kwargs)
        block = self.block
        for key, hook in list(block._forward_hooks.items()):
            if key in block._forward_hooks_with_kwargs:
                result = hook(block, (x, *args), kwargs, y)
            else:
                result = hook(block, (x, *args), y)
            if result is not None:
                y = result
        return y

    def _run_block(self, x_sel: Tensor, args: tuple, kwargs: dict) -> Tensor:
        return self.block.forward(x_sel, *args, **kwargs)  # its hooks see the full sequence instead


def _layer_indices(layers: Iterable[int] | None, n: int) -> list[int]:
    if layers is None:
        return list(range(1, n, 2))  # the paper's best: routed blocks alternate with full ones
    chosen = []
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"to_mod: layers must be ints, got {i!r}")
        if not -n <= i < n:
            raise ValueError(f"to_mod: layer {i} is out of range for {n} blocks")
        chosen.append(i % n)
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"to_mod: layers has duplicates: {list(layers)}")
    if not chosen:
        raise ValueError("to_mod: layers is empty")
    return sorted(chosen)


def _width(block: nn.Module, model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for name in ("hidden_size", "n_embd"):
        if config is not None and isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    for attr in ("dim", "embed_dim", "num_features"):
        if isinstance(getattr(block, attr, None), int):
            return getattr(block, attr)
    norm = getattr(block, "norm1", None)
    if isinstance(norm, nn.LayerNorm):
        return norm.normalized_shape[0]
    raise ValueError(f"to_mod: cannot tell the width of {type(block).__name__}")


def to_mod(
    model: nn.Module,
    layers: Iterable[int] | None = None,
    capacity: float = 0.125,
    *,
    blocks: str | None = None,
    router: str = "mod",
    share_router: bool = False,
    sampling: str | None = None,
    keep_first: int | None = None,
) -> nn.Module:
    """Wrap blocks of ``model`` in :class:`effnn.MoDBlock`, in place; returns ``model``.

    Args:
        model: a transformers GPT-2, BERT-like or Llama-like model, a timm Vision Transformer, or
            any model with a list of :class:`effnn.nn.PreNormBlock`.
        layers: indices into the block list (negative counts from the end). Default: every other
            block, starting with the second (the paper's alternating layout). gamma-MoD: the
            layers :func:`select_mod_layers` picks from :func:`arank`.
        capacity: fraction of the tokens each converted block processes (k = ceil(capacity * T)).
        blocks: dotted path to the ``nn.ModuleList`` of blocks (default: found by name).
        router: ``"mod"`` (the paper's r = w^T x) or ``"gamma"`` (gamma-MoD's two-way softmax
            router, routing on the block's own input norm where it has one).
        share_router: one router instance for every converted block (gamma-MoD's shared router).
        sampling: ``None``, ``"router"`` or ``"predictor"``: see :class:`effnn.MoDBlock`.
        keep_first: leading tokens always routed; default: a timm ViT's prefix tokens (class and
            register tokens), else 0.

    State dict keys of a converted block gain a ``block.`` level (``h.1.attn...`` becomes
    ``h.1.block.attn...``) and ``router.weight``: load pretrained weights before converting, or
    convert a fresh model the same way before loading a converted checkpoint. transformers models
    get ``config.use_cache = False``: their KV cache cannot follow per-token skipping.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"to_mod: model must be an nn.Module, got {type(model).__name__}")
    check_capacity(capacity, "to_mod")
    if router not in ROUTERS:
        raise ValueError(f"to_mod: router must be one of {ROUTERS}, got {router!r}")
    path, block_list = _find_blocks(model, blocks)
    chosen = _layer_indices(layers, len(block_list))
    if keep_first is None:
        keep_first = int(getattr(model, "num_prefix_tokens", 0) or 0)
    shared = None
    for i in chosen:
        block = block_list[i]
        if isinstance(block, MoDBlock):
            raise ValueError(f"to_mod: {path}.{i} is already a MoDBlock")
        family = _family(block)
        if family is None:
            raise TypeError(
                f"to_mod: {path}.{i} is a {type(block).__name__}, which to_mod does not know (GPT-2, "
                "BERT, Llama-like, timm ViT blocks, PreNormBlock); wrap it with effnn.MoDBlock and "
                "its token_args"
            )
        dim = _width(block, model)
        ref = next(block.parameters(), None)
        factory = {"device": getattr(ref, "device", None), "dtype": getattr(ref, "dtype", None)}
        router_type = MoDRouter if router == "mod" else GammaRouter
        if share_router:
            shared = shared if shared is not None else router_type(dim, **factory)
            block_router = shared
        else:
            block_router = router_type(dim, **factory)
        options = {
            "router": block_router,
            "sampling": sampling,
            "keep_first": keep_first,
            "router_norm": family.router_norm if router == "gamma" else None,
            "token_args": family.token_args,
        }
        if family.cache_args:
            block_list[i] = HFMoDBlock(block, dim, capacity, cache_args=family.cache_args, **options)
        else:
            block_list[i] = MoDBlock(block, dim, capacity, **options)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = False
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and hasattr(generation_config, "use_cache"):
        generation_config.use_cache = False
    return model


# ------------------------------------------------------------------------------------------------
# ARank
# ------------------------------------------------------------------------------------------------


def attention_rank(
    maps: Tensor, *, tolerance: float, zero_diagonal: bool = True, valid: Tensor | None = None
) -> Tensor:
    """Mean numerical rank of attention maps ``maps`` (B, H, N, N) over samples and heads.

    The rank of a map is the number of its singular values above ``tolerance`` times its largest
    one (``torch.linalg.matrix_rank(..., rtol=tolerance)``, in float64). ``zero_diagonal`` zeroes
    every map's diagonal first, as the official code does (``compute_attention_rank`` in
    ``gamma_mod/model/language_model/llava_llama.py``). ``valid`` (B, N) bool marks real tokens:
    rows and columns of padding are zeroed, so a map's rank is that of its real part.
    """
    if not isinstance(maps, Tensor) or maps.dim() != 4 or maps.shape[-1] != maps.shape[-2]:
        raise ValueError(f"attention_rank: maps must have shape (B, H, N, N), got "
                         f"{tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < 1:
        raise ValueError(f"attention_rank: tolerance must be a number in [0, 1), got {tolerance!r}")
    a = maps.detach().to(torch.float64)
    if not torch.isfinite(a).all():
        raise ValueError("attention_rank: maps contain NaN or inf")
    if zero_diagonal:
        a = a * (1 - torch.eye(a.shape[-1], dtype=a.dtype, device=a.device))
    if valid is not None:
        v = valid.to(a.dtype)
        a = a * v[:, None, :, None] * v[:, None, None, :]
    return torch.linalg.matrix_rank(a, rtol=tolerance).to(torch.float64).mean()


def _timm_maps(model: nn.Module, blocks: nn.ModuleList, run: Callable[[], Any]) -> list[Tensor]:
    """Attention maps of timm blocks, recomputed from each attention's input (timm's fused
    attention never forms them)."""
    maps: list[Tensor] = []

    def hook(attn: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0]
        B, N, _ = x.shape
        qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        maps.append(((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1))

    handles = [b.attn.register_forward_pre_hook(hook, with_kwargs=True) for b in blocks]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return maps


def _prenorm_maps(blocks: nn.ModuleList, run: Callable[[], Any]) -> list[Tensor]:
    maps: list[Tensor] = []

    def hook(block: PreNormBlock, args: tuple, kwargs: dict) -> None:
        x = args[0]
        positions = args[1] if len(args) > 1 else kwargs.get("positions")
        B, T, _ = x.shape
        q, k, _ = block.qkv(block.norm1(x)).view(B, T, 3, block.num_heads, block.head_dim).permute(2, 0, 3, 1, 4)
        if block.rope:
            positions = torch.arange(T, device=x.device).unsqueeze(0) if positions is None else positions
            q, k = block._rotary(q, positions.expand(B, T)), block._rotary(k, positions.expand(B, T))
        scores = (q @ k.transpose(-2, -1)) / block.head_dim**0.5
        if block.causal:
            scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
        maps.append(scores.softmax(dim=-1))

    handles = [b.register_forward_pre_hook(hook, with_kwargs=True) for b in blocks
               if isinstance(b, PreNormBlock)]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return maps


@torch.no_grad()
def arank(
    model: nn.Module,
    inputs: Any,
    *,
    tolerance: float,
    zero_diagonal: bool = True,
    blocks: str | None = None,
) -> Tensor:
    """gamma-MoD's ARank of every layer: the mean rank of its attention maps over heads and the
    samples of ``inputs`` (a float64 tensor (L,), one value per block).

    ``model``: a transformers model (``inputs`` a dict of its keyword arguments; its
    ``attention_mask``, if any, excludes padding), a timm ViT (``inputs`` an image batch), or a
    model whose blocks are :class:`effnn.nn.PreNormBlock` (``inputs`` a tensor or a tuple of
    positional arguments). The model runs once in eval mode; its mode is restored.

    ``tolerance`` is explicit on purpose: a map's rank counts its singular values above
    ``tolerance`` x its largest one, and with ``matrix_rank``'s default (about 1e-5 at N = 200 in
    float32) a random model reports near-full rank in every layer. The official code uses the
    default tolerance, one sample (batch element 0) and zeroes the diagonal; the paper averages
    over samples. ARank says something only for trained weights.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"arank: model must be an nn.Module, got {type(model).__name__}")
    was_training = model.training
    model.eval()
    try:
        valid = None
        if hasattr(model, "config") and hasattr(model, "set_attn_implementation"):
            if not isinstance(inputs, dict):
                raise TypeError("arank: for a transformers model, inputs must be a dict of its "
                                f"keyword arguments, got {type(inputs).__name__}")
            previous = model.config._attn_implementation
            model.set_attn_implementation("eager")  # sdpa never forms the attention maps
            try:
                maps = list(model(**inputs, output_attentions=True).attentions)
            finally:
                model.set_attn_implementation(previous)
            mask = inputs.get("attention_mask")
            valid = None if mask is None else mask.bool()
        else:
            _, block_list = _find_blocks(model, blocks)
            args = inputs if isinstance(inputs, tuple) else (inputs,)
            if all(isinstance(b, PreNormBlock) or isinstance(getattr(b, "block", None), PreNormBlock)
                   for b in block_list):
                inner = nn.ModuleList([getattr(b, "block", b) for b in block_list])
                maps = _prenorm_maps(inner, lambda: model(*args))
            elif all(_family(b) is _TIMM for b in block_list):
                maps = _timm_maps(model, block_list, lambda: model(*args))
            else:
                raise TypeError(
                    f"arank: cannot read the attention maps of {type(model).__name__}; use "
                    "attention_rank(maps, tolerance=...) with maps you collected")
    finally:
        model.train(was_training)
    if not maps:
        raise ValueError("arank: the model returned no attention maps")
    return torch.stack([attention_rank(m, tolerance=tolerance, zero_diagonal=zero_diagonal, valid=valid)
                        for m in maps])


def select_mod_layers(aranks: Sequence[float] | Tensor, keep: int = 4) -> list[int]:
    """gamma-MoD's rule: the ``keep`` layers of highest ARank stay dense, every layer whose ARank
    is below the ``keep``-th largest becomes MoD (the author, Gamma-MOD issue #5: "only 4 layers
    remain with high values" in LLaVA-HR). Layers tied with the threshold stay dense. Returns the
    indices to convert, ascending (for :func:`to_mod`'s ``layers``)."""
    values = torch.as_tensor(aranks, dtype=torch.float64).flatten()
    if values.numel() == 0:
        raise ValueError("select_mod_layers: aranks is empty")
    if not torch.isfinite(values).all():
        raise ValueError("select_mod_layers: aranks contain NaN or inf")
    if isinstance(keep, bool) or not isinstance(keep, int) or not 0 <= keep <= values.numel():
        raise ValueError(f"select_mod_layers: keep must be an int in [0, {values.numel()}], got {keep!r}")
    if keep == 0:
        return list(range(values.numel()))
    threshold = torch.sort(values, descending=True).values[keep - 1]
    return [i for i in range(values.numel()) if values[i] < threshold]
