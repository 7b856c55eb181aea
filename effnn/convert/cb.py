"""Insert Context Broadcasting (Hyeon-Woo et al., ICCV 2023) into an existing transformer.

The paper adds CB to every block, on the output of the MLP, before the residual addition::

    x = x + attn(norm1(x))
    x = x + CB(mlp(norm2(x)))           # CB(m)_i = (m_i + mean_j m_j) / 2

:func:`insert_cb` does this in place with a forward hook on each block's MLP submodule and a
parameter-free :class:`~effnn.nn.broadcast.ContextBroadcast` child registered on that submodule
(named ``context_broadcast``, so it shows in ``print(model)`` and travels with ``deepcopy``,
pickling and ``.to()``). Nothing with state is added: ``state_dict`` keys and values are unchanged,
checkpoints of the plain model load into the CB model and back, and :func:`remove_cb` restores the
plain model.

Anything applied between the MLP and the residual addition that scales features per sample or per
channel (timm's LayerScale ``ls2`` and DropPath ``drop_path2``) commutes with the token mean, so
hooking the MLP is the same as applying CB right before the addition.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import nn

from effnn.nn.broadcast import ContextBroadcast, _token_dims

__all__ = ["insert_cb", "remove_cb"]

CHILD_NAME = "context_broadcast"


def _apply_context_broadcast(module: nn.Module, args, output):
    """The forward hook: CB on the output of the hooked MLP (a module-level function, so models
    with CB deep-copy and pickle)."""
    return getattr(module, CHILD_NAME)(output)


def _has_cb(module: nn.Module) -> bool:
    return isinstance(getattr(module, CHILD_NAME, None), ContextBroadcast)


def _find_path(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _auto_block_lists(model: nn.Module, mlp: str) -> list[str]:
    """Names of the outermost ``nn.ModuleList``/``nn.Sequential`` containers whose every element
    has the submodule ``mlp``."""
    found: list[str] = []
    for fqn, m in model.named_modules():
        if not isinstance(m, (nn.ModuleList, nn.Sequential)) or len(m) == 0:
            continue
        if any(f == "" or fqn.startswith(f + ".") for f in found):
            continue  # inside a container already found
        if all(_find_path(block, mlp) is not None for block in m):
            found.append(fqn)
    return found


def _block_lists(model: nn.Module, blocks: str | Sequence[str] | None, mlp: str) -> list[str]:
    if blocks is None:
        found = _auto_block_lists(model, mlp)
        if len(found) == 1:
            return found
        if not found:
            raise ValueError(
                f"insert_cb: found no nn.ModuleList/nn.Sequential whose every element has a "
                f"submodule {mlp!r}; pass blocks='path.to.block_list' and mlp='name of the MLP "
                "submodule in each block'"
            )
        raise ValueError(
            f"insert_cb: several block lists have a submodule {mlp!r} in every element: "
            f"{found}; pass blocks=[...] with the ones to convert"
        )
    names = [blocks] if isinstance(blocks, str) else list(blocks)
    if not names or not all(isinstance(n, str) for n in names):
        raise TypeError(f"insert_cb: blocks must be a string or a list of strings, got {blocks!r}")
    for name in names:
        container = _find_path(model, name)
        if not isinstance(container, (nn.ModuleList, nn.Sequential)):
            got = "nothing" if container is None else type(container).__name__
            raise ValueError(
                f"insert_cb: blocks={name!r} must name an nn.ModuleList or nn.Sequential of "
                f"blocks in the model, found {got}"
            )
    return names


def insert_cb(
    model: nn.Module,
    *,
    blocks: str | Sequence[str] | None = None,
    mlp: str = "mlp",
    layers: Iterable[int] | None = None,
    token_dim: int | Sequence[int] = 1,
) -> nn.Module:
    """Add Context Broadcasting after the MLP of transformer blocks, in place, keeping the
    ``state_dict`` unchanged.

    Args:
        model: e.g. a timm ``VisionTransformer`` (its ``blocks``, MLP ``mlp``) or any model with a
            list of blocks.
        blocks: the dotted name (or a list of names) of the ``nn.ModuleList``/``nn.Sequential``
            holding the blocks, e.g. ``"vit.encoder.layer"``. Default: the one container in the
            model whose every element has the submodule ``mlp`` (an error if there are several).
        mlp: the dotted name, inside each block, of the module whose output is the MLP branch
            before the residual addition: ``"mlp"`` for timm ViTs/DeiT, ``"output.dropout"`` for
            Hugging Face ``ViTLayer`` (whose ``output`` module adds the residual itself).
        layers: indices of the blocks to convert (negative indices count from the end), numbered
            through all ``blocks`` containers in order. Default: every block, as in the paper.
        token_dim: the token axis (or axes) of the MLP output: 1 for (batch, tokens, features).

    Returns ``model``. CB averages over *all* tokens along ``token_dim``, the class token included
    (the paper's formula); padded tokens of variable-length batches would enter the mean too.
    The hooks fire only when a block calls its MLP as a module (``self.mlp(x)``), which timm and
    Hugging Face do.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"insert_cb: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(mlp, str) or not mlp:
        raise TypeError(f"insert_cb: mlp must be a non-empty string, got {mlp!r}")
    dims = _token_dims(token_dim, "insert_cb")
    all_blocks: list[tuple[str, nn.Module]] = []
    for name in _block_lists(model, blocks, mlp):
        container = model.get_submodule(name)
        all_blocks += [(f"{name}.{i}" if name else str(i), b) for i, b in enumerate(container)]

    n = len(all_blocks)
    if layers is None:
        chosen = list(range(n))
    else:
        chosen = []
        for i in layers:
            if isinstance(i, bool) or not isinstance(i, int):
                raise TypeError(f"insert_cb: layers must be ints, got {i!r}")
            if not -n <= i < n:
                raise ValueError(f"insert_cb: layer index {i} is out of range for {n} blocks")
            chosen.append(i % n)
        chosen = sorted(set(chosen))
        if not chosen:
            raise ValueError("insert_cb: layers is empty; nothing to insert")

    targets = []
    for i in chosen:
        fqn, block = all_blocks[i]
        target = _find_path(block, mlp)
        if target is None:
            children = ", ".join(name for name, _ in block.named_children()) or "none"
            raise ValueError(
                f"insert_cb: block {fqn} has no submodule {mlp!r} (its children: {children}); "
                "pass mlp='name of the MLP submodule'"
            )
        if _has_cb(target):
            raise ValueError(
                f"insert_cb: {fqn}.{mlp} already has Context Broadcasting; call remove_cb first"
            )
        targets.append(target)
    for target in targets:  # validated everything first: no half-converted model on error
        target.add_module(CHILD_NAME, ContextBroadcast(dims[0] if len(dims) == 1 else dims))
        target.register_forward_hook(_apply_context_broadcast)
    return model


def remove_cb(model: nn.Module) -> nn.Module:
    """Remove every Context Broadcasting that :func:`insert_cb` added; returns ``model``.

    Raises ``ValueError`` if the model has none.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"remove_cb: model must be an nn.Module, got {type(model).__name__}")
    targets = [m for m in model.modules() if _has_cb(m)]
    if not targets:
        raise ValueError("remove_cb: the model has no Context Broadcasting to remove")
    for m in targets:
        delattr(m, CHILD_NAME)
        for key, hook in list(m._forward_hooks.items()):
            if hook is _apply_context_broadcast:
                del m._forward_hooks[key]
                m._forward_hooks_with_kwargs.pop(key, None)
                m._forward_hooks_always_called.pop(key, None)
    return model
