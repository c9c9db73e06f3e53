"""Deprecated alias of :mod:`admmcompress.finalize.quantized` (kept for one release).

Import ``QuantizedMaskSet``, ``HeldValues``, ``hard_quantize``, ``partial_quantize``, ``release_holds``,
``mask_set_from_state`` and ``FIXED_LEVEL_UPDATES`` from :mod:`admmcompress.finalize`; instead of
``is_quantization(target)`` ask ``target.structure.quantizes``.
"""

from admmcompress.deprecation import moved_module
from admmcompress.finalize import quantized as _new

__all__ = list(_new.__all__)


__getattr__ = moved_module("admmcompress.quantize", _new, "admmcompress.finalize")
