"""Save a compacted transformers model so ``from_pretrained`` rebuilds it, where its config can say the new shapes.

``compact`` leaves a model whose layers are narrower than its config says. :func:`pretrained_config` finds a
config that builds exactly those shapes: uniform FFN width (every layer kept the same number of units) becomes
``intermediate_size`` (``n_inner``, ``encoder_ffn_dim``, ... whichever the config has), uniform head counts become
``num_attention_heads`` / ``num_key_value_heads`` with ``head_dim`` kept. Whether it works is not assumed: the
model class is built from the candidate config on the meta device and every parameter's name and shape must
match. (transformers 5 has no ``pruned_heads`` any more, so per-layer head counts cannot be said.)

:func:`save_compacted_pretrained` then writes ``save_pretrained`` output (GPT-2's ``Conv1D`` layers, swapped for
``nn.Linear`` to prune them, are swapped back first) and, given example inputs, reloads it with
``from_pretrained`` and checks the outputs. Where the config cannot say the shapes (different widths per layer,
a hidden size pruned under LayerNorm, whose statistics keep the original width, per-layer head counts, a head
size the config derives from the hidden size), it writes the library's manifest (``manifest.json`` +
``model.safetensors``, reload with ``load_compacted(folder, skeleton)``) and returns the one-line reason.

>>> config, changed, reason = pretrained_config(torch.nn.Linear(2, 2))
>>> config, reason
(None, 'Linear is not a transformers model with a config')
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from admmcompress.atomic import atomic_folder
from admmcompress.executors.manifest import _write_compacted
from admmcompress.models.conv1d import conv1d_from_linear
from admmcompress.plan.attention import attention_layouts
from admmcompress.plan.graph import call_model, output_tensors
from admmcompress.plan.residual import WidthKeepingLayerNorm

FFN_KEYS = ("intermediate_size", "n_inner", "encoder_ffn_dim", "decoder_ffn_dim", "ffn_dim", "hidden_dim")
HEAD_KEYS = ("num_attention_heads",)  # transformers maps n_head / encoder_attention_heads onto it (attribute_map)


@dataclass
class SavedModel:
    """Where the model went, in which format, and why not ``save_pretrained`` when it is the manifest."""

    folder: Path
    format: str  # "pretrained" or "manifest"
    reason: str = ""
    changed: dict[str, Any] | None = None  # config keys rewritten for save_pretrained
    max_abs_diff: float | None = None  # reloaded vs given model on the example inputs


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in model.state_dict().items()}


def _build_on_meta(model: nn.Module, config) -> nn.Module:
    with torch.device("meta"):
        return type(model)(config)


def _ffn_width(config) -> tuple[str | None, int]:
    """The config key that sets the FFN width, and the width. GPT-2-style configs leave it ``None`` for
    4 x hidden_size (its default); a wrong guess costs nothing: the rebuilt shapes are compared below."""
    for key in FFN_KEYS:
        if isinstance(getattr(config, key, None), int):
            return key, getattr(config, key)
    hidden = getattr(config, "hidden_size", None)
    for key in FFN_KEYS:
        if hasattr(config, key) and getattr(config, key) is None and isinstance(hidden, int):
            return key, 4 * hidden
    return None, 0


def pretrained_config(model: nn.Module) -> tuple[Any | None, dict[str, Any], str]:
    """``(config, changed keys, "")`` for a config that rebuilds ``model``'s shapes, or ``(None, {}, reason)``.

    ``model`` has the layer types its class builds (GPT-2's ``Conv1D``, not the ``nn.Linear`` it was pruned as).
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(type(model), "from_pretrained"):
        return None, {}, f"{type(model).__name__} is not a transformers model with a config"
    if any(isinstance(m, WidthKeepingLayerNorm) for m in model.modules()):
        return None, {}, ("the hidden size was pruned: its LayerNorms keep the statistics of the original width "
                          "(WidthKeepingLayerNorm), which transformers' LayerNorm and config cannot say")
    wanted = _shapes(model)
    original = _shapes(_build_on_meta(model, config))
    changed: dict[str, Any] = {}
    ffn_key, old = _ffn_width(config)
    if ffn_key is not None:
        new = {w for name, shape in wanted.items() for w, o in zip(shape, original.get(name, ()), strict=False)
               if o == old and w != o}
        if len(new) > 1:
            return None, {}, f"the FFN layers keep different widths {sorted(new)}; the config has one {ffn_key}"
        if new:
            changed[ffn_key] = new.pop()
    layouts = list(attention_layouts(model).values())
    heads = {(lay.heads, lay.kv_heads, lay.head_dim) for lay in layouts}
    if len(heads) > 1:
        counts = sorted({lay.heads for lay in layouts})
        return None, {}, f"the attention blocks keep different head counts {counts}; the config has one"
    if heads:
        count, kv, head_dim = heads.pop()
        if count != config.num_attention_heads:
            changed["num_attention_heads"] = count
            if hasattr(config, "head_dim"):
                changed["head_dim"] = head_dim
        if kv is not None and getattr(config, "num_key_value_heads", kv) != kv:
            changed["num_key_value_heads"] = kv
        elif kv is None and isinstance(getattr(config, "num_key_value_heads", None), int) and count != \
                config.num_key_value_heads:
            changed["num_key_value_heads"] = count
    candidate = copy.deepcopy(config)
    for key, value in changed.items():
        setattr(candidate, key, value)
    rebuilt = _shapes(_build_on_meta(model, candidate))
    if rebuilt != wanted:
        differ = sorted(k for k in set(rebuilt) | set(wanted) if rebuilt.get(k) != wanted.get(k))
        shown = ", ".join(f"{k} {wanted.get(k)} vs config {rebuilt.get(k)}" for k in differ[:3])
        return None, {}, f"no config of {type(config).__name__} builds these shapes ({shown})"
    return candidate, changed, ""


@torch.no_grad()
def save_compacted_pretrained(
    model: nn.Module,
    folder: str | Path,
    example_inputs: Any = None,
    conv1d_names: list[str] | None = None,
    atol: float = 1e-4,
    overwrite: bool = False,
) -> SavedModel:
    """``save_pretrained`` output in ``folder`` when the config can say ``model``'s shapes, else the manifest.

    ``conv1d_names`` (what ``linear_from_conv1d`` returned) are turned back into ``Conv1D`` in a copy before saving.
    With ``example_inputs`` the saved model is reloaded (``from_pretrained`` / ``load_compacted``) and its outputs
    compared with ``model``'s; a difference above ``atol`` raises ``ValueError``.

    The folder is written whole beside ``folder`` and renamed into place once complete (and checked): a failure
    or a kill leaves no half-written model. A ``folder`` that holds files is refused unless ``overwrite=True``,
    which replaces it only then (its old content is renamed to ``<folder>.replaced`` for the moment of the swap).
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"'{folder}' is a file; a model is saved as a folder, choose another path")
    if _holds_files(folder) and not overwrite:
        raise ValueError(
            f"'{folder}' already holds files; save into a new or empty folder, or pass overwrite=True to replace "
            "them once the new save is complete"
        )
    out = copy.deepcopy(model)
    if conv1d_names:
        conv1d_from_linear(out, conv1d_names)  # the layout the model class builds (and its shapes are compared in)
    config, changed, reason = pretrained_config(out)
    if config is None:
        saved = SavedModel(folder, "manifest", f"saved as the library's manifest, not save_pretrained: {reason}")

        def write(into: Path) -> None:
            _write_compacted(model, into)
            if example_inputs is not None:
                from admmcompress.executors.manifest import load_compacted

                skeleton = type(model)(model.config) if hasattr(model, "config") else copy.deepcopy(model)
                saved.max_abs_diff = _check(load_compacted(into, skeleton), model, example_inputs, atol)
    else:
        out.config = config
        saved = SavedModel(folder, "pretrained", changed=changed)

        def write(into: Path) -> None:
            out.save_pretrained(into)
            if example_inputs is not None:
                saved.max_abs_diff = _check(type(model).from_pretrained(into), model, example_inputs, atol)

    _write_whole(folder, write)
    return saved


def _holds_files(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())


def _write_whole(folder: Path, write: Callable[[Path], None]) -> None:
    """``write`` a new folder whole (:func:`~admmcompress.atomic.atomic_folder`) in place of ``folder``; one that
    holds files is set aside only once the new one is complete, and removed after the swap."""
    if not _holds_files(folder):
        atomic_folder(folder, write)
        return
    staged = folder.with_name(f"{folder.name}.new")
    aside = folder.with_name(f"{folder.name}.replaced")
    for path in (staged, aside):
        if path.exists():
            raise ValueError(f"'{path}' is in the way of replacing '{folder}'; move it away (a kept earlier save?)")
    atomic_folder(staged, write)
    os.rename(folder, aside)
    try:
        os.rename(staged, folder)
    except OSError:
        os.rename(aside, folder)  # the earlier save back in place; the new one stays beside it, named
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _check(reloaded: nn.Module, model: nn.Module, example_inputs: Any, atol: float) -> float:
    training = model.training
    try:
        got = output_tensors(call_model(reloaded.eval(), example_inputs))
        want = output_tensors(call_model(model.eval(), example_inputs))
    finally:
        model.train(training)
    diff = max((float((a.float() - b.float()).abs().max()) for a, b in zip(got, want, strict=True) if a.numel()),
               default=0.0)
    if not diff <= atol:
        raise ValueError(f"the reloaded model differs from the saved one by {diff:.3g} (> atol={atol:g}); report this")
    return diff


__all__ = ["SavedModel", "pretrained_config", "save_compacted_pretrained"]
