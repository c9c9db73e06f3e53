"""Deprecated alias of :mod:`admmcompress.finalize.masks` (kept for one release).

Import ``MaskSet``, ``masks_from_model`` and ``prune_masks`` from :mod:`admmcompress.finalize`;
``hard_prune`` from :mod:`admmcompress` (or :mod:`admmcompress.finalize`).
"""

import warnings

from admmcompress import finalize as _finalize
from admmcompress.finalize import masks as _new

__all__ = [*_new.__all__, *_finalize.hard.__all__]


def __getattr__(name: str):
    if name == "hard_prune":
        warnings.warn(
            "admmcompress.masks.hard_prune moved: import it from admmcompress (or admmcompress.finalize)",
            DeprecationWarning,
            stacklevel=2,
        )
        return _finalize.hard_prune
    if name.startswith("__") or not hasattr(_new, name):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"admmcompress.masks moved: import {name} from admmcompress.finalize", DeprecationWarning, stacklevel=2
    )
    return getattr(_new, name)
