"""Distillation teachers: one frozen model, or an ensemble of same-architecture checkpoints.

An ensemble teacher predicts the mean of its members' logits, so the student's soft targets are
softmax(mean logits / T). Several independently trained dense models are a stronger teacher than any
one of them, at no cost to the compressed model (the teacher only runs during training).

Example::

    teacher = load_teacher(model, ["dense_s0.safetensors", "dense_s1.safetensors"])
    logits = teacher(x)  # mean of the two members' logits, no gradients
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from admmcompress.train import checkpoint as ckpt


class LogitEnsemble(nn.Module):
    """Frozen ensemble whose output is the mean of its members' outputs (logits)."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble teacher needs at least one member")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(dim=0)


def _frozen(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def load_teacher(
    model: nn.Module,
    files: str | Sequence[str] | None,
    state: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Build the distillation teacher for ``model``.

    ``state`` (a teacher state dict saved with a run's checkpoint) wins; else ``files`` is one checkpoint
    or a list of them (an ensemble); with neither, the teacher is a frozen copy of ``model`` as it is now.
    Raises ValueError naming the file when one is missing or does not fit the model.
    """
    ensemble = isinstance(files, (list, tuple))
    paths = list(files) if ensemble else [files]
    members = [copy.deepcopy(model) for _ in paths]
    teacher = _frozen(LogitEnsemble(members) if ensemble else members[0])
    if state is not None:
        teacher.load_state_dict(state)
        return teacher
    for member, path in zip(members, paths, strict=True):
        if path is None:  # no file: the copy of the model as it is now
            continue
        if not Path(path).is_file():
            raise ValueError(f"teacher: checkpoint '{path}' does not exist; give the dense model's file")
        try:
            ckpt.load_weights(member, path)
        except ValueError as err:
            raise ValueError(f"teacher: {err}") from None
    return teacher
