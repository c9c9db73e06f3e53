"""The finalizer: from a driven model to the exact structure, before masked retraining.

``hard_prune`` zeroes what each target's structure removes (``masks.prune_masks``) and, for
quantization targets or values held by an earlier stage, then quantizes the kept weights
(``quantized.hard_quantize``), so drivers call one function whatever the structure.

Example::

    masks = hard_prune(model, plan.resolve(model))   # a MaskSet (a QuantizedMaskSet when quantizing)
    masks.attach(model, optimizer)                    # pruned weights stay zero while retraining
"""

from __future__ import annotations

import torch

from admmcompress.finalize.masks import MaskSet, prune_masks
from admmcompress.finalize.quantized import QuantizedMaskSet, hard_quantize
from admmcompress.plan.rules import resolve_targets


@torch.no_grad()
def hard_prune(model: torch.nn.Module, targets, frozen: MaskSet | None = None) -> MaskSet:
    """Project each target's weight itself (not W+U, see SPEC P4), zero the rest, return the masks.

    Several targets on one parameter intersect; ``frozen`` masks from earlier stages are kept.
    With quantization targets (or values held by ``frozen``) the kept weights are then
    quantized and a ``QuantizedMaskSet`` is returned (see :mod:`admmcompress.finalize.quantized`).
    """
    targets = resolve_targets(model, targets, "hard_prune")
    masks = prune_masks(model, targets, frozen)
    if isinstance(frozen, QuantizedMaskSet) or any(t.structure.quantizes for t in targets):
        return hard_quantize(model, targets, masks, frozen)  # prune first, then quantize the kept weights
    return masks


__all__ = ["hard_prune"]
