"""Rewrite existing models in place: one module per transformation.

- :mod:`effnn.convert.linear`: ``swap_linear`` and the layer configs (``MonarchConfig``), and the
  config registry that ``effnn.save``/``effnn.load`` use.
"""

from effnn.convert.linear import (
    MonarchConfig,
    config_from_dict,
    config_of,
    config_to_dict,
    swap_linear,
)

__all__ = ["MonarchConfig", "config_from_dict", "config_of", "config_to_dict", "swap_linear"]
