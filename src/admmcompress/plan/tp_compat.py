"""A fix for Torch-Pruning 1.6.x's trace of concatenations along a negative axis (GPT-2's key/value cache).

``torch_pruning.dependency.index_mapping.update_concat_index_mapping`` reads the concatenated axis from the
autograd node; a negative axis (``torch.cat(..., dim=-2)``, as transformers' cache does) comes back as a huge
unsigned number, slips past its "not the channel axis" test, and the channel counts of the inputs, which it
cannot infer there, are summed while still ``None``: ``TypeError: unsupported operand type(s) for +: 'int' and
'NoneType'``. Torch-Pruning's own code a few lines later gives up on such a concatenation (no index mapping);
:func:`patch_torch_pruning` makes it do that before the sum. Installed once, by
:func:`~admmcompress.plan.graph.build_dependency_graph`; it changes nothing else.

>>> patch_torch_pruning(); patch_torch_pruning()   # idempotent
>>> from torch_pruning.dependency import index_mapping
>>> getattr(index_mapping.update_concat_index_mapping, "_admm_fixed", False)
True
"""

from __future__ import annotations

import functools


def patch_torch_pruning() -> None:
    """Wrap Torch-Pruning's concat index mapping so unknown input channel counts skip the mapping (idempotent)."""
    from torch_pruning.dependency import index_mapping

    original = index_mapping.update_concat_index_mapping
    if getattr(original, "_admm_fixed", False):
        return

    @functools.wraps(original)
    def fixed(graph, cat_node) -> None:
        try:
            original(graph, cat_node)
        except TypeError:
            sizes = getattr(cat_node.module, "concat_sizes", None) or ()
            if None not in sizes:  # not the failure this fixes
                raise

    fixed._admm_fixed = True
    index_mapping.update_concat_index_mapping = fixed


__all__ = ["patch_torch_pruning"]
