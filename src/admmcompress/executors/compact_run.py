"""Compaction as a run step: compact a pruned model, check it on random inputs, save it, report it.

Used by the ``Runner`` (``compact: true`` in a run config) and by ``admmcompress export --compact``.
The compacted model is written as ``manifest.json`` + ``model.safetensors``
(:mod:`admmcompress.executors.manifest`), so it reloads without the original widths; the figures
(parameters and MACs before and after, the largest output difference) go into ``metrics.json`` and
``report.md``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from admmcompress.executors.compact import CompactConfig, CompactionError, CompactionResult, compact
from admmcompress.executors.fold import forward
from admmcompress.masks import MaskSet
from admmcompress.report.compaction import render_compaction

COMPACT_DIR = "compact"


def count_macs(model: nn.Module, example_inputs) -> int:
    """Multiply-accumulates of the Conv/Linear layers (and column executors) for the first sample."""
    from admmcompress.executors.column import ColumnConv2d, ColumnLinear

    total = 0

    def hook(module: nn.Module, _inputs, output) -> None:
        nonlocal total
        if isinstance(module, nn.modules.conv._ConvNd):
            per_out = module.in_channels // module.groups * int(torch.tensor(module.kernel_size).prod())
            total += output[0].numel() * per_out
        elif isinstance(module, nn.Linear):
            total += output[0].numel() * module.in_features
        elif isinstance(module, (ColumnConv2d, ColumnLinear)):
            total += output[0].numel() * module.kept.numel()

    kinds = (nn.modules.conv._ConvNd, nn.Linear, ColumnConv2d, ColumnLinear)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    training = model.training
    try:
        with torch.no_grad():
            forward(model.eval(), _first(example_inputs))
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    return total


def random_inputs(example: torch.Tensor, count: int, seed: int = 0) -> torch.Tensor:
    """``count`` standard-normal inputs shaped like one sample of ``example`` (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, *example.shape[1:], generator=generator, dtype=example.dtype)


def _first(x):
    if isinstance(x, torch.Tensor):
        return x[:1]
    return type(x)(t[:1] for t in x)


def compact_checked(
    model: nn.Module,
    example: torch.Tensor,
    masks: MaskSet | None = None,
    atol: float = 1e-4,
    samples: int = 8,
    columns: str = "off",
    seed: int = 0,
) -> tuple[CompactionResult, dict[str, Any]]:
    """Compact ``model`` (masks applied), verify on two sets of random inputs; return the result and figures.

    ``example`` gives the input shape (one batch from the data). The compactor checks its own trace
    inputs; a second, independent set of ``samples`` random inputs is checked here against the masked
    model, and any ``max |diff| > atol`` raises ``CompactionError`` (the model is never silently wrong).
    """
    masked = copy.deepcopy(model)
    if masks is not None:
        masks.apply(masked)
    masked.eval()
    trace = random_inputs(example, max(2, samples), seed)
    result = compact(masked, trace, config=CompactConfig(atol=atol, columns=columns))
    small = result.model.eval()
    check = random_inputs(example, samples, seed + 1)
    with torch.no_grad():
        diff = float((small(check) - masked(check)).abs().max())
    if not diff <= atol:
        raise CompactionError(
            f"the compacted model differs from the masked model by {diff:.3g} (> atol={atol:g}) on "
            f"{samples} random inputs; report the model (compaction of its layers is not exact)"
        )
    figures = {
        "params_before": result.params_before,
        "params_after": result.params_after,
        "macs_before": count_macs(masked, example),
        "macs_after": count_macs(small, example),
        "max_abs_diff": max(diff, result.max_abs_diff),
        "atol": atol,
        "random_inputs": samples + max(2, samples),
        "removed": {label: list(pair) for label, pair in result.removed.items() if pair[0]},
        "folded": dict(result.folded),
        "columns": {name: str(info) for name, info in result.columns.items()},
    }
    return result, figures


def save_compact(
    result: CompactionResult, figures: dict[str, Any], folder: str | Path, model_spec: dict[str, Any]
) -> dict[str, Any]:
    """Save the compacted model (manifest + safetensors) into ``folder``; ``figures`` gains its path."""
    from admmcompress.executors.manifest import save_compacted

    folder = Path(folder)
    save_compacted(result.model, folder, model_spec)
    return {**figures, "folder": str(folder)}


def model_spec(model_config: dict[str, Any]) -> dict[str, Any]:
    """``{"name", "kwargs"}`` for the manifest, from a run config's ``model:`` mapping."""
    return {"name": model_config["name"], "kwargs": {k: v for k, v in model_config.items() if k != "name"}}


__all__ = [
    "COMPACT_DIR",
    "compact_checked",
    "count_macs",
    "model_spec",
    "random_inputs",
    "render_compaction",
    "save_compact",
]
