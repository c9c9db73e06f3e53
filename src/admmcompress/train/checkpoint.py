"""Checkpoints that survive a kill at any point and never unpickle code.

Training state goes through ``torch.save`` and is read back with ``weights_only=True``
(tensors and plain containers only). Final weights and masks are written as safetensors.
Every file is written to a temporary name in the same folder, flushed to disk, then
renamed over the old one, so a crash leaves either the old or the new file, never half.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from admmcompress.atomic import atomic_write


def save_state(path: str | Path, state: dict[str, Any]) -> Path:
    """Save a training state (tensors, numbers, strings, lists, dicts) atomically."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path: str | Path) -> dict[str, Any]:
    """Load a training state without unpickling arbitrary objects."""
    return torch.load(path, map_location="cpu", weights_only=True)


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None) -> Path:
    """Save named tensors as safetensors; ``metadata`` values are stored as JSON strings."""
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    return atomic_write(path, lambda tmp: save_file(flat, str(tmp), metadata=meta))


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    return load_file(str(path))


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load a safetensors state dict into ``model``; a mismatch names the missing/unexpected keys."""
    state = load_tensors(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(
            f"checkpoint '{path}' does not fit {type(model).__name__}: missing {missing}, "
            f"unexpected {unexpected}, wrong shapes {wrong}; is it for another model?"
        )
    model.load_state_dict(state)
