"""Putting a rebuilt layer into a model by its dotted name: every executor, loader and plan rewrite goes through
:func:`replace_module`, so a rewritten layer keeps the train/eval mode of the one it replaces (a layer built
fresh starts in train mode: a BatchNorm rebuilt inside an eval-mode model would otherwise normalise with batch
statistics and update its running ones)."""

from __future__ import annotations

from torch import nn


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module | None:
    """Set ``new`` as the submodule ``name`` of ``model``, in the mode of the module it replaces (or of its parent
    where there was none); returns the replaced module.

    >>> import torch
    >>> model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).eval()
    >>> old = replace_module(model, "1", nn.BatchNorm1d(2))
    >>> model[1].training, isinstance(old, nn.BatchNorm1d)
    (False, True)
    """
    if not name:
        raise ValueError("replace_module needs a submodule's name; the whole model cannot replace itself")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child, None)
    new.train(old.training if isinstance(old, nn.Module) else parent.training)
    setattr(parent, child, new)
    return old if isinstance(old, nn.Module) else None


__all__ = ["replace_module"]
