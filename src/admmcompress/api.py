"""One call for users without their own loop: ``compress(model, plan, train, test, ...)``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from admmcompress.data.datasets import Split
from admmcompress.drivers.reweighted import ReweightedConfig
from admmcompress.masks import MaskSet
from admmcompress.plan import Plan
from admmcompress.report.render import render_markdown, save_report
from admmcompress.train.config import ADMMPhaseConfig, PhaseConfig, RunConfig, StageConfig
from admmcompress.train.runner import Runner


@dataclass
class CompressionResult:
    """The compressed (masked) model, its masks, the measured metrics and per-epoch history."""

    model: nn.Module
    masks: MaskSet
    metrics: dict[str, Any]
    history: list[dict[str, Any]]

    @property
    def report(self) -> str:
        return render_markdown(self.metrics)

    def save(self, out_dir: str | Path, title: str = "admmcompress report") -> str:
        return save_report(out_dir, self.metrics, self.history, title)


def compress(
    model: nn.Module,
    plan: Plan | list[Plan],
    train: Split,
    test: Split,
    *,
    method: str = "admm",
    admm: ADMMPhaseConfig | dict[str, Any] | None = None,
    retrain: PhaseConfig | dict[str, Any] | None = None,
    reweighted: ReweightedConfig | dict[str, Any] | None = None,
    batch_size: int = 64,
    seed: int = 0,
    out_dir: str | Path | None = None,
    progress: bool = False,
) -> CompressionResult:
    """Compress a trained ``model`` toward ``plan`` with the reference loop.

    A list of plans runs progressive (multi-step) pruning, each step starting from the last.
    ``method`` is "admm", "gradual" (iterative magnitude) or "magnitude" (one-shot), all
    with the same epoch budget; "reweighted" is reweighted group lasso (``reweighted={"penalty":
    1e-4}``; ``admm`` then gives its epochs and reweighting cadence). With ``out_dir``, state is
    checkpointed there every epoch.

    >>> from admmcompress import Plan, Unstructured, compress  # doctest: +SKIP
    >>> result = compress(model, Plan({"fc1": Unstructured(compression=50)}), train, test,
    ...                   admm={"epochs": 4}, retrain={"epochs": 2})  # doctest: +SKIP
    >>> print(result.report)  # doctest: +SKIP
    """
    plans = plan if isinstance(plan, list) else [plan]
    stages = [
        StageConfig(plan=p, method=method, admm=admm or ADMMPhaseConfig(), retrain=retrain or PhaseConfig(),
                    reweighted=reweighted or ReweightedConfig())
        for p in plans
    ]
    config = RunConfig(model={"name": type(model).__name__}, data={"batch_size": batch_size}, seed=seed,
                       pretrained="<in-memory model>", stages=stages)
    runner = Runner(config, model, train, test, out_dir=out_dir, progress=progress, train_dense=False)
    metrics = runner.run()
    return CompressionResult(model, runner.masks, metrics, runner.history)
