"""Structures by name: the one lookup for plans, the CLI and the tests, pruning and quantization alike.

This module imports every built-in structure module first, so the registry it reads is complete
whichever module a user imported before (user structures join through ``@register_structure`` or a
run config's ``plugins:`` list).

>>> structure_from_dict({"structure": "shape", "sparsity": 0.5})        # an alias of column
Column(sparsity=0.5, compression=None)
>>> structure_from_dict({"structure": "fixed_point", "bits": 4}).quantizes
True
>>> "binary" in list_quantizers() and "binary" not in STRUCTURES
True
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

# The built-ins register themselves when their module runs; import them here so no lookup misses one.
from admmcompress.structures import block, crossbar, heads, lowrank, nm, quantization, sparsity  # noqa: F401
from admmcompress.structures.base import _ALIASES, _CLASSES, Structure


def list_structures(aliases: bool = True, quantizes: bool | None = None) -> list[str]:
    """Names accepted in a plan's ``structure`` field: canonical names (sorted), then aliases (sorted).

    ``quantizes=False`` / ``True`` keeps only pruning / quantization structures.

    >>> list_structures(aliases=False, quantizes=False)[:3]
    ['block', 'block_row', 'channel']
    """
    names = sorted(n for n, cls in _CLASSES.items() if quantizes is None or cls.quantizes == quantizes)
    if not aliases:
        return names
    return names + sorted(a for a, n in _ALIASES.items() if n in names)


def list_quantizers() -> list[str]:
    """Names of the quantization structures and their aliases (``list_structures(quantizes=True)``)."""
    return list_structures(quantizes=True)


def structure_class(name: str) -> type[Structure] | None:
    """The class registered as ``name`` (or an alias of it); None if there is none.

    >>> structure_class("row").__name__
    'Filter'
    """
    if not isinstance(name, str):
        return None
    return _CLASSES.get(_ALIASES.get(name, name))


def structure_from_dict(spec: Mapping[str, Any], where: str = "structure") -> Structure:
    """Build any registered structure from ``{"structure": name, ...target keys}``.

    Raises ``ValueError`` prefixed with ``where`` (e.g. ``plan rule #2``) naming the problem and the fix.
    """
    name = spec.get("structure")
    if name is None:
        raise ValueError(f"{where}: missing 'structure' (one of {', '.join(list_structures())})")
    if not isinstance(name, str):
        raise ValueError(f"{where}: structure={name!r} must be a name, one of {', '.join(list_structures())}")
    cls = structure_class(name)
    if cls is None:
        raise ValueError(f"{where}: unknown structure '{name}'; choose one of {', '.join(list_structures())}")
    try:
        return cls.from_dict(spec)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


class _Registered(Mapping[str, type[Structure]]):
    """A read-only live view of the registry: canonical name -> class, filtered by ``quantizes``."""

    def __init__(self, quantizes: bool):
        self._quantizes = quantizes

    def _names(self) -> list[str]:
        return list_structures(aliases=False, quantizes=self._quantizes)

    def __getitem__(self, name: str) -> type[Structure]:
        cls = _CLASSES.get(name)
        if cls is None or cls.quantizes != self._quantizes:
            raise KeyError(name)
        return cls

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def __repr__(self) -> str:
        return f"{dict(self)!r}"


#: Pruning structures by name (a view of the registry, kept for code written before it).
STRUCTURES: Mapping[str, type[Structure]] = _Registered(quantizes=False)
#: Quantization structures by name (a view of the registry, kept for code written before it).
QUANTIZERS: Mapping[str, type[Structure]] = _Registered(quantizes=True)


__all__ = [
    "QUANTIZERS",
    "STRUCTURES",
    "list_quantizers",
    "list_structures",
    "structure_class",
    "structure_from_dict",
]
