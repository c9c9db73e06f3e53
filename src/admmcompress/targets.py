"""Deprecated alias: ``Target`` and ``PlanError`` live in :mod:`admmcompress.plan` (kept for one release)."""

import warnings

from admmcompress.plan import targets as _new

__all__ = list(_new.__all__)


def __getattr__(name: str):
    if name not in _new.__all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(f"admmcompress.targets moved: import {name} from admmcompress.plan", DeprecationWarning, stacklevel=2)
    return getattr(_new, name)
