"""Old home of :class:`Target` and :class:`PlanError`: both now live in :mod:`admmcompress.structures.targets`."""

from admmcompress.structures.targets import PlanError, Target

__all__ = ["PlanError", "Target"]
