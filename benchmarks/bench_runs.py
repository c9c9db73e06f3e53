"""Benchmarks that use the Runner write one run folder per setting, like ``admmcompress run --out``.

Each folder holds ``config.yaml``, ``metrics.json``, ``report.md`` and plots, so ``admmcompress report
--compare FOLDER...`` (the same code as :func:`table`) prints the benchmark's table, and ``admmcompress
report FOLDER`` the detail of one setting.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from admmcompress.data import Split
from admmcompress.report.compare import compare_table, load_summary, plot_compare
from admmcompress.report.render import save_report
from admmcompress.train import checkpoint as ckpt
from admmcompress.train.config import RunConfig
from admmcompress.train.runner import STATE_FILE, Runner


def run_in_folder(config: RunConfig, model: nn.Module, train: Split, test: Split, out: Path) -> dict[str, Any]:
    """Run ``config`` on ``model`` (already trained: no pretraining) into the fresh folder ``out``; its metrics.

    A folder left by an earlier run of the same setting is replaced (the benchmark reruns it).
    """
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    text = yaml.safe_dump(json.loads(json.dumps(config.to_dict())), sort_keys=False)
    (out / "config.yaml").write_text(text)
    runner = Runner(config, model, train, test, out_dir=out, progress=False, train_dense=False)
    metrics = runner.run()
    ckpt.save_tensors(out / "model.safetensors", model.state_dict(), {"config": config.to_dict()})
    ckpt.save_tensors(out / "masks.safetensors", runner.masks.state_dict())
    (out / STATE_FILE).unlink(missing_ok=True)  # the run is finished: keep the results, not the resume state
    save_report(out, metrics, runner.history, f"{config.name}")
    return metrics


def table(folders: Sequence[Path], png: Path | None = None) -> str:
    """The ``admmcompress report --compare`` table of the finished ``folders`` (and its plot, if ``png``)."""
    done = [f for f in folders if (f / "metrics.json").is_file()]
    if not done:
        return "no finished runs"
    summaries = [load_summary(f) for f in done]
    if png is not None:
        plot_compare(summaries, png)
    return compare_table(summaries)

