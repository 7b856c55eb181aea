"""Rewrite existing models in place: one module per transformation.

- :mod:`effnn.convert.linear`: ``swap_linear`` and the layer configs (``MonarchConfig``), and the
  config registry that ``effnn.save``/``effnn.load`` use.
- :mod:`effnn.convert.cb`: ``insert_cb``/``remove_cb``, Context Broadcasting after each block's MLP.
- :mod:`effnn.convert.ones`: ``gather_experts``/``gather_all_experts`` (OneS: MoE -> dense FFN)
  and the ``distillation_loss`` of its refinement step.
- :mod:`effnn.convert.mod`: ``to_mod`` (Mixture-of-Depths blocks), gamma-MoD's ``arank`` and
  ``select_mod_layers``.
"""

from effnn.convert.cb import insert_cb, remove_cb
from effnn.convert.linear import (
    MonarchConfig,
    config_from_dict,
    config_of,
    config_to_dict,
    swap_linear,
)
from effnn.convert.mod import arank, attention_rank, select_mod_layers, to_mod
from effnn.convert.ones import distillation_loss, gather_all_experts, gather_experts

__all__ = ["arank", "attention_rank", "select_mod_layers", "to_mod", "distillation_loss", "gather_all_experts", "gather_experts", "insert_cb", "remove_cb", "MonarchConfig", "config_from_dict", "config_of", "config_to_dict", "swap_linear"]
