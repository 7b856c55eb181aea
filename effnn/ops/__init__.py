"""Functional ops, one file per op family: ``<op>_ref`` (plain PyTorch, the specification), the
registered ``torch.library`` op with its fake function, autograd and FLOP formula, and dispatch."""

from effnn.ops.monarch import monarch_linear, monarch_project, monarch_to_dense

__all__ = ["monarch_linear", "monarch_project", "monarch_to_dense"]
