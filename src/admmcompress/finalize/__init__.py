"""The finalizer: from a driven model to the exact structure, and what holds it there while retraining.

- :mod:`~admmcompress.finalize.masks`: ``MaskSet`` (pruned weights stay zero under any optimizer),
  ``prune_masks``, ``masks_of`` (the same masks, weights untouched), ``masks_from_model``;
- :mod:`~admmcompress.finalize.quantized`: ``QuantizedMaskSet`` and ``HeldValues`` (quantized weights stay
  on their levels), ``hard_quantize``, ``partial_quantize``, ``release_holds``, ``mask_set_from_state``;
- :mod:`~admmcompress.finalize.hard`: ``hard_prune``, the one call drivers make whatever the structure.

>>> import torch.nn as nn
>>> from admmcompress.plan import Plan
>>> from admmcompress.structures import Unstructured
>>> model = nn.Linear(4, 2)
>>> masks = hard_prune(model, Plan({"": Unstructured(sparsity=0.5)}).resolve(model))
>>> int((model.weight != 0).sum())
4
"""

from admmcompress.finalize.hard import hard_prune
from admmcompress.finalize.masks import MaskSet, masks_from_model, masks_of, prune_masks
from admmcompress.finalize.quantized import (
    FIXED_LEVEL_UPDATES,
    UPDATES,
    HeldValues,
    QuantizedMaskSet,
    hard_quantize,
    is_quantization,
    mask_set_from_state,
    partial_quantize,
    release_holds,
)

__all__ = [
    "FIXED_LEVEL_UPDATES",
    "UPDATES",
    "HeldValues",
    "MaskSet",
    "QuantizedMaskSet",
    "hard_prune",
    "hard_quantize",
    "is_quantization",
    "mask_set_from_state",
    "masks_from_model",
    "masks_of",
    "partial_quantize",
    "prune_masks",
    "release_holds",
]
