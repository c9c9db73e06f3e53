"""Factorized layers as data: what a saved file records so its loader can build them without the user's help.

A model whose convs a low-rank target rewrote holds :class:`~admmcompress.executors.tucker.Tucker2Conv` and
:class:`~admmcompress.executors.penni.SharedKernelConv` modules where its model code builds plain convs, so a
model built from the registry does not take its state dict. ``factorized_spec`` names those layers with their
structure as a plan writes it (``{"conv2": {"structure": "tucker2", "ranks": [r_o, r_i]}}``), read from the
modules themselves; ``rebuild_factorized`` gives a freshly built model the same modules, shapes only (the state
dict is loaded next). The packed format records the spec beside its model spec (``executors.packed``).

>>> from torch import nn
>>> from admmcompress.executors.tucker import factorize_tucker2
>>> model = factorize_tucker2(nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Conv2d(8, 6, 3)), {"2": (3, 2)})
>>> spec = factorized_spec(model)
>>> spec
{'2': {'structure': 'tucker2', 'ranks': [3, 2]}}
>>> fresh = rebuild_factorized(nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Conv2d(8, 6, 3)), spec)
>>> fresh.load_state_dict(model.state_dict())
<All keys matched successfully>
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from admmcompress.executors.base import ExecutorError
from admmcompress.executors.penni import SharedKernelConv
from admmcompress.executors.tucker import Tucker2Conv
from admmcompress.module_swap import replace_module
from admmcompress.structures.registry import structure_from_dict


def factorized_spec(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{layer: structure dict}`` for every Tucker-2 and shared-kernel conv of ``model``, in module order."""
    spec: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        if isinstance(module, Tucker2Conv):
            spec[name] = {"structure": "tucker2", "ranks": list(module.ranks)}
        elif isinstance(module, SharedKernelConv):
            spec[name] = {"structure": "shared_kernels", "bases": int(module.basis.shape[0])}
    return spec


def rebuild_factorized(model: nn.Module, spec: Mapping[str, Any], where: str = "factorized layers") -> nn.Module:
    """Replace (in place) each conv ``spec`` names by its factorized module, without weights; returns ``model``.

    Every entry is checked before anything changes: a malformed one, a structure that does not factorize, or a
    layer that is not a plain ``Conv2d`` of ``model`` is one ``ExecutorError`` line prefixed with ``where``.
    """
    if not isinstance(spec, Mapping):
        raise ExecutorError(f"{where}: must map layer names to structures, not {type(spec).__name__}")
    modules = dict(model.named_modules())
    built = []
    for name, entry in spec.items():
        if not isinstance(entry, Mapping):
            raise ExecutorError(f"{where}: layer {name!r} needs a structure mapping, not {entry!r}")
        try:
            structure = structure_from_dict(entry, f"{where}: layer {name!r}")
        except ValueError as err:
            raise ExecutorError(str(err)) from None
        if structure.kind not in ("tucker2", "shared_kernels") or (
                structure.kind == "tucker2" and structure.ranks is None):
            raise ExecutorError(f"{where}: layer {name!r} records {dict(entry)}; only tucker2 with ranks or "
                                "shared_kernels are rebuilt")
        conv = modules.get(name)
        if type(conv) is not nn.Conv2d:
            found = "not in the model" if conv is None else f"a {type(conv).__name__}"
            raise ExecutorError(f"{where}: layer {name!r} is {found}, not the Conv2d it factorized (another model?)")
        try:  # ranks above the conv's widths, bases above its kernel positions, grouped convs
            built.append((name, Tucker2Conv(conv, structure.ranks) if structure.kind == "tucker2"
                          else SharedKernelConv(conv, structure.bases)))
        except ValueError as err:
            raise ExecutorError(f"{where}: layer {name!r}: {err}") from None
    for name, module in built:  # only now: every entry could be built
        replace_module(model, name, module)
    return model


__all__ = ["factorized_spec", "rebuild_factorized"]
