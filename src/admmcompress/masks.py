"""Deprecated alias of :mod:`admmcompress.finalize.masks` (kept for one release).

Import ``MaskSet``, ``masks_from_model`` and ``prune_masks`` from :mod:`admmcompress.finalize`;
``hard_prune`` from :mod:`admmcompress` (or :mod:`admmcompress.finalize`).
"""

from admmcompress import finalize as _finalize
from admmcompress.deprecation import moved_module
from admmcompress.finalize import masks as _new

__all__ = [*_new.__all__, *_finalize.hard.__all__]


__getattr__ = moved_module(
    "admmcompress.masks", _new, "admmcompress.finalize",
    {"hard_prune": (_finalize.hard_prune, "admmcompress (or admmcompress.finalize)")},
)
