"""Channel widths under a width multiplier, rounded exactly as structured pruning rounds them.

A model built with ``width_mult=w`` has ``scaled(c, w)`` channels where the full model has ``c``;
this is the same count ``kept_count(c, 1 - w)`` that a filter target at sparsity ``1 - w`` keeps, so
a uniformly pruned and compacted model has exactly the widths of the model built at ``width_mult``
(the "ideal" in the speed benchmarks).

>>> scaled(64, 0.5), scaled(10, 0.25), scaled(3, 0.01)
(32, 2, 1)
"""

from __future__ import annotations


def scaled(channels: int, width_mult: float) -> int:
    """``max(1, round(channels * width_mult))`` with Python's round-half-to-even."""
    if not width_mult > 0:
        raise ValueError(f"width_mult={width_mult!r} must be > 0, e.g. 0.5 for half-width layers")
    return max(1, int(round(channels * width_mult)))
