"""Deprecated alias of :mod:`admmcompress.finalize.quantized` (kept for one release).

Import ``QuantizedMaskSet``, ``HeldValues``, ``hard_quantize``, ``partial_quantize``, ``release_holds``,
``mask_set_from_state`` and ``FIXED_LEVEL_UPDATES`` from :mod:`admmcompress.finalize`; instead of
``is_quantization(target)`` ask ``target.structure.quantizes``.
"""

import warnings

from admmcompress.finalize import quantized as _new

__all__ = list(_new.__all__)


def __getattr__(name: str):
    if name.startswith("__") or not hasattr(_new, name):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"admmcompress.quantize moved: import {name} from admmcompress.finalize", DeprecationWarning, stacklevel=2
    )
    return getattr(_new, name)
