"""One base class for every structure, pruning or quantization, and the decorator that registers it.

A structure says what a layer's parameter may look like after compression and how to get there: its
exact Euclidean projection (``project``), the entries that projection keeps (``support``), which modules
and parameters it applies to (``check_module``, ``params``, ``bind``) and how a plan writes it
(``to_dict`` / ``from_dict``). ``quantizes`` tells pruning (False) from quantization (True); ask it
instead of testing classes.

A new structure is one class plus ``@register_structure``; the name becomes the plan's
``structure:`` value and the class's ``kind``. Lookups by name live in
:mod:`admmcompress.structures.registry` (``structure_from_dict``, ``list_structures``).

>>> from dataclasses import dataclass
>>> from admmcompress.structures.sparsity import SparsityStructure
>>> from admmcompress.structures import groups
>>> @register_structure("first_row_doc")
... @dataclass(frozen=True)
... class FirstRow(SparsityStructure):
...     def group_ids(self, weight):
...         rows, cols = groups.as_matrix(weight).shape
...         return groups.row_ids(rows, cols, weight.device), rows
>>> FirstRow.kind, FirstRow(sparsity=0.5).quantizes
('first_row_doc', False)
>>> unregister_structure("first_row_doc")
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, TypeVar

import torch


class Structure(ABC):
    """What one parameter may look like: a constraint set with an exact projection.

    Subclasses are frozen dataclasses (hashable, comparable). Class-level fields:

    - ``kind``: the registered name (set by :func:`register_structure`), also the suffix of target keys;
    - ``quantizes``: False for pruning (the set is a support pattern), True for quantization (a level set);
    - ``options``: extra keys a plan rule may give besides ``structure`` and the target.
    """

    kind: ClassVar[str] = ""
    quantizes: ClassVar[bool] = False
    #: True for low-rank structures (structures/lowrank.py): the weight is replaced by its factors at the end.
    factorizes: ClassVar[bool] = False
    options: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def project(self, weight: torch.Tensor) -> torch.Tensor:
        """Nearest point (Euclidean) of the constraint set to ``weight``; a new tensor."""

    @abstractmethod
    def support(self, weight: torch.Tensor) -> torch.Tensor:
        """Boolean mask (``weight``'s shape) of the entries the projection may keep nonzero."""

    @abstractmethod
    def check_module(self, module: torch.nn.Module, name: str) -> None:
        """Raise ``ValueError`` naming layer ``name`` and the fix if this structure cannot apply to ``module``."""

    @abstractmethod
    def params(self, module: torch.nn.Module) -> list[str]:
        """Names of ``module``'s parameters this structure constrains, one target each."""

    @abstractmethod
    def bind(self, module: torch.nn.Module, param: str) -> Structure:
        """This structure specialised to ``module.<param>`` (e.g. its gate count); often itself."""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """The plan-rule form, ``{"structure": kind, ...}``; ``from_dict`` reads it back."""

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> Structure:
        """Build from a plan rule's keys (``structure`` already resolved to this class)."""
        raise NotImplementedError(f"{cls.__name__}: define from_dict(spec) so plans can name this structure")

    @classmethod
    def example(cls) -> Structure:
        """A small valid instance; the registry property tests project tiny tensors with it."""
        raise NotImplementedError(
            f"{cls.__name__}: define an example() classmethod returning a small valid instance "
            "(the registry property tests build one for every registered structure)"
        )


# The registry: canonical name -> class, alias -> canonical name. Read it through
# admmcompress.structures.registry, which imports the built-in structures first.
_CLASSES: dict[str, type[Structure]] = {}
_ALIASES: dict[str, str] = {}

S = TypeVar("S", bound=type[Structure])


def _same_class(a: type, b: type) -> bool:
    # A re-imported module (a reloaded plugin) defines a new class object with the same name.
    return a is b or (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def register_structure(name: str, aliases: Iterable[str] = ()) -> Callable[[S], S]:
    """Class decorator: register a :class:`Structure` subclass under ``name`` (and ``aliases``).

    Sets the class's ``kind`` to ``name``. Raises ``ValueError`` if the name or an alias is taken by
    another class, ``TypeError`` if the class is not a ``Structure``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_structure: name={name!r} must be a non-empty string, e.g. 'unstructured'")
    aliases = (aliases,) if isinstance(aliases, str) else tuple(aliases)
    if not all(isinstance(a, str) and a for a in aliases):
        raise ValueError(f"register_structure('{name}'): aliases={aliases!r} must be non-empty strings")

    def decorate(cls: S) -> S:
        if not (isinstance(cls, type) and issubclass(cls, Structure)):
            raise TypeError(
                f"register_structure('{name}'): {cls!r} is not a Structure; derive it from "
                "SparsityStructure or QuantizationStructure (admmcompress.structures)"
            )
        for key in (name, *aliases):
            holder = _CLASSES.get(_ALIASES.get(key, key))
            if holder is not None and not _same_class(holder, cls):
                raise ValueError(
                    f"register_structure: '{key}' already names {holder.__module__}.{holder.__qualname__}; "
                    "choose another name"
                )
        if name in _ALIASES:
            raise ValueError(f"register_structure: '{name}' is an alias of '{_ALIASES[name]}'; choose another name")
        own = cls.__dict__.get("kind")
        if own not in (None, "", name):
            fix = "give extra names as aliases=" if own in _CLASSES else "drop the kind line (the name is the kind)"
            raise ValueError(f"register_structure('{name}'): {cls.__name__} already has kind={own!r}; {fix}")
        cls.kind = name
        _CLASSES[name] = cls
        for alias in aliases:
            _ALIASES[alias] = name
        return cls

    return decorate


def unregister_structure(name: str) -> None:
    """Remove ``name`` and its aliases from the registry (for tests and reloaded plugins)."""
    if name not in _CLASSES:
        raise KeyError(f"unregister_structure: no structure is registered as '{name}'")
    del _CLASSES[name]
    for alias in [a for a, target in _ALIASES.items() if target == name]:
        del _ALIASES[alias]


__all__ = ["Structure", "register_structure", "unregister_structure"]
