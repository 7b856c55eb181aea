"""FSDP2 shards parameters as DTensors; the few places that need a whole parameter (weight
conversions, statistics over all of a tensor) read it through :func:`full_tensor`."""

from torch import Tensor


def full_tensor(t: Tensor) -> Tensor:
    """A sharded (FSDP2/DTensor) tensor as the whole tensor, the same on every rank (a
    collective: every rank must call it); any other tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
