"""Save and load models whose linears were swapped for effnn layers.

``effnn.save(model, path)`` writes one safetensors file: the weights, and in its metadata which
submodules are effnn layers and the config that rebuilds each. ``effnn.load(model, path)`` takes a
freshly built model (the original architecture, with ``nn.Linear`` where effnn layers were), makes
the same swaps and loads the weights. Nothing is unpickled.
"""

from __future__ import annotations

import json

import torch
from torch import nn

from effnn.convert import config_from_dict, config_of, config_to_dict

__all__ = ["save", "load"]

_METADATA_KEY = "effnn_swaps"


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as e:
        raise ImportError("effnn.save/effnn.load need safetensors: pip install safetensors") from e
    return safetensors


def save(model: nn.Module, path: str) -> None:
    """Write ``model``'s weights and its effnn swaps to the safetensors file ``path``."""
    swaps = {}
    for fqn, module in model.named_modules():
        config = config_of(module)
        if config is not None:
            swaps[fqn] = config_to_dict(config)
    st = _safetensors()
    st.torch.save_model(model, path, metadata={_METADATA_KEY: json.dumps(swaps)})


def load(model: nn.Module, path: str, *, strict: bool = True, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild in ``model`` the effnn layers recorded in ``path`` and load its weights.

    ``model`` is the freshly built original architecture (already swapped is fine too). The weights
    are read to ``device`` and copied into the model's parameters. Returns ``model``.
    """
    st = _safetensors()
    with st.safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
    if _METADATA_KEY not in metadata:
        raise ValueError(f"effnn.load: {path} was not written by effnn.save (no {_METADATA_KEY!r} metadata)")
    for fqn, data in json.loads(metadata[_METADATA_KEY]).items():
        config = config_from_dict(data)
        try:
            current = model.get_submodule(fqn)
        except AttributeError as e:
            raise ValueError(f"effnn.load: {path} has an effnn layer at {fqn!r}, which the model lacks") from e
        if type(current) is config.module_type:
            continue
        if not isinstance(current, nn.Linear):
            raise ValueError(
                f"effnn.load: {fqn!r} must be an nn.Linear (or {config.module_type.__name__}) to take "
                f"the saved layer, got {type(current).__name__}"
            )
        # Built on meta (no projection, no init), then given memory where the linear lived.
        with torch.device("meta"):
            shell = nn.Linear(current.in_features, current.out_features, bias=current.bias is not None,
                              dtype=current.weight.dtype)
        model.set_submodule(fqn, config.build(shell).to_empty(device=current.weight.device))
    st.torch.load_model(model, path, strict=strict, device=str(device))
    return model
