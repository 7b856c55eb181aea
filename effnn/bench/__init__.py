"""``effnn bench`` (also ``python -m effnn.bench``): microbenchmarks of every registered layer
against its dense baseline, in the same run. See :mod:`effnn.bench.registry` to add a layer's cases
and :mod:`effnn.bench.runner` for how times, ratios and peak memory are measured."""

from effnn.bench.command import add_arguments, build_parser, main, run
from effnn.bench.registry import (
    BASELINE,
    FORWARD,
    TRAIN,
    Case,
    Layer,
    Setting,
    Workload,
    get_layer,
    layers,
    linear_flops,
    parse_ints,
    register_layer,
)
from effnn.bench.runner import Results, run_cases

__all__ = [
    "BASELINE", "FORWARD", "TRAIN", "Case", "Layer", "Results", "Setting", "Workload",
    "add_arguments", "build_parser", "get_layer", "layers", "linear_flops", "main", "parse_ints",
    "register_layer", "run", "run_cases",
]
