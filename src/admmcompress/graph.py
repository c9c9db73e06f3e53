"""Deprecated alias of :mod:`admmcompress.plan.graph` (kept for one release): import from there."""

from admmcompress.deprecation import moved_module
from admmcompress.plan import graph as _new

__all__ = list(_new.__all__)


__getattr__ = moved_module("admmcompress.graph", _new, "admmcompress.plan.graph")
