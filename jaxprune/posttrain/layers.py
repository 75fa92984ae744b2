"""The linear layers of a traced model, as post-training pruning sees them.

:class:`Layer` and :func:`linear_layers` live in :mod:`jaxprune.surgery.linear`, the one
place that says which axes of a weight are its inputs (what the traced ``dot_general``
contracts); Wanda, SparseGPT, FLAP and their N:M groups all read it from there.
"""

from jaxprune.surgery.linear import Layer, linear_layers

__all__ = ["Layer", "linear_layers"]
