"""nn.Modules: parameters, input validation and one op call each."""

from effnn.nn.monarch import MonarchLinear

__all__ = ["MonarchLinear"]
