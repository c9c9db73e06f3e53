"""Experiment logs of a run: one row per epoch as ``log.csv`` and/or TensorBoard events (``logging:`` config).

Logged per epoch: the data loss, the driver's penalty, test accuracy, and what the driver reports (ADMM: rho and
the per-layer residual ``||W - Z|| / ||W||``), plus each pruned layer's sparsity. The CSV is rewritten whole from
the run's history at every epoch (atomically), so after ``--resume`` it holds each epoch once; TensorBoard
events of epochs after the checkpoint a run resumes from are purged (``purge_step``). The run's
``training.png`` is drawn from the same history, as before.

>>> rows = flatten_entry({"phase": "stage1/prune", "loss": 0.5, "residual": {"conv1.weight": 0.1}})
>>> rows
{'phase': 'stage1/prune', 'loss': 0.5, 'residual/conv1.weight': 0.1}
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from admmcompress.atomic import atomic_write
from admmcompress.structures.groups import factor_params
from admmcompress.train.config import LoggingConfig

CSV_FILE = "log.csv"
TENSORBOARD_DIR = "tensorboard"


def flatten_entry(entry: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A history entry as flat ``name -> value`` columns (nested mappings joined with ``/``; lists dropped)."""
    out: dict[str, Any] = {}
    for key, value in entry.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_entry(value, f"{name}/"))
        elif isinstance(value, (str, int, float, bool)) or value is None:
            out[name] = value
    return out


def numeric_scalars(progress: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a driver's ``progress()`` as flat ``name -> float`` (what training-framework loggers take).

    >>> numeric_scalars({"rho": 0.1, "residual": {"fc1": 0.5}, "note": "x", "done": True})
    {'rho': 0.1, 'residual/fc1': 0.5}
    """
    flat = flatten_entry(progress).items()
    return {k: float(v) for k, v in flat if isinstance(v, int | float) and not isinstance(v, bool)}


@torch.no_grad()
def layer_sparsity(model: nn.Module, layers: list[str]) -> dict[str, float]:
    """Fraction of exactly-zero weights of each named layer: its ``weight`` parameter, or of a factorized layer
    (``Tucker2Conv``, ``SharedKernelConv``) its factors' weights, as the report counts them (the dense weight its
    ``weight`` rebuilds from them has no zeros to speak of)."""
    modules = dict(model.named_modules())
    out: dict[str, float] = {}
    for name in layers:
        module = modules.get(name)
        factors = [module.get_parameter(p) for p in factor_params(module)] if module is not None else []
        weights = factors or [getattr(module, "weight", None)]
        if all(isinstance(w, torch.Tensor) for w in weights) and sum(w.numel() for w in weights):
            out[name] = float(sum(int((w == 0).sum()) for w in weights)) / sum(w.numel() for w in weights)
    return out


def csv_text(history: list[Mapping[str, Any]]) -> str:
    """The history as CSV: one row per epoch, columns in order of first appearance (empty where absent)."""
    rows = [flatten_entry(entry) for entry in history]
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


class EpochLogger:
    """Writes a run's per-epoch history to ``folder/log.csv`` and/or ``folder/tensorboard/`` as ``cfg`` asks.

    ``start``: how many history entries the run already holds (a resumed run), so TensorBoard drops events
    written after that point by the interrupted invocation.
    """

    def __init__(self, folder: str | Path, cfg: LoggingConfig, start: int = 0):
        self.folder, self.cfg = Path(folder), cfg
        self._writer = None
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError(
                    "logging.tensorboard needs the tensorboard package: pip install 'admmcompress[tensorboard]' "
                    "(or set tensorboard: false and read log.csv)"
                ) from None
            self._writer = SummaryWriter(str(self.folder / TENSORBOARD_DIR), purge_step=start)

    def log(self, history: list[Mapping[str, Any]]) -> None:
        """Record the newest entry of ``history`` (the CSV is rewritten from all of it)."""
        if self.cfg.csv:
            text = csv_text(history)
            atomic_write(self.folder / CSV_FILE, lambda tmp: tmp.write_text(text))
        if self._writer is not None and history:
            step = len(history) - 1
            for key, value in flatten_entry(history[-1]).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch":
                    self._writer.add_scalar(key, value, step)
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


__all__ = ["CSV_FILE", "EpochLogger", "TENSORBOARD_DIR", "csv_text", "flatten_entry", "layer_sparsity"]
