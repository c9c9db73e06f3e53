"""Deprecated alias: ``Target`` and ``PlanError`` live in :mod:`admmcompress.plan` (kept for one release)."""

from admmcompress.deprecation import moved_module
from admmcompress.plan import targets as _new

__all__ = list(_new.__all__)


__getattr__ = moved_module("admmcompress.targets", _new, "admmcompress.plan")
