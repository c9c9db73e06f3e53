"""Module aliases kept for one release after a module moved: one ``__getattr__`` maker for all of them.

>>> import types
>>> new = types.SimpleNamespace(answer=42)
>>> getter = moved_module("pkg.old", new, "pkg.new")
>>> import warnings
>>> with warnings.catch_warnings(record=True) as caught:
...     warnings.simplefilter("always")
...     getter("answer"), str(caught[0].message)
(42, 'pkg.old.answer moved: import it from pkg.new')
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any


def moved_module(
    old: str, new: Any, home: str, elsewhere: dict[str, tuple[Any, str]] | None = None
) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for the alias module ``old``: names of ``new`` (and ``elsewhere``:
    ``{name: (object, its home)}``) are returned with a ``DeprecationWarning`` that says where to import
    them from now; any other name is an ``AttributeError``."""

    def __getattr__(name: str) -> Any:
        if elsewhere and name in elsewhere:
            value, where = elsewhere[name]
        elif not name.startswith("__") and hasattr(new, name):
            value, where = getattr(new, name), home
        else:
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        warnings.warn(f"{old}.{name} moved: import it from {where}", DeprecationWarning, stacklevel=2)
        return value

    return __getattr__


__all__ = ["moved_module"]
