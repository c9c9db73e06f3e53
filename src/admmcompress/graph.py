"""Deprecated alias of :mod:`admmcompress.plan.graph` (kept for one release): import from there."""

import warnings

from admmcompress.plan import graph as _new

__all__ = list(_new.__all__)


def __getattr__(name: str):
    if name.startswith("__") or not hasattr(_new, name):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"admmcompress.graph moved: import {name} from admmcompress.plan.graph", DeprecationWarning, stacklevel=2
    )
    return getattr(_new, name)
