"""Training machinery that acts on whole models and optimizers, one module per method, callable
from any training loop (no framework callbacks).

- :mod:`effnn.train.gblr`: GBLR's sigma schedule, the proximal step on widths that holds a FLOP
  budget, its optimizer parameter groups, and the official multiply-add counts.
"""
