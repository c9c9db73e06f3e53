"""The Lightning callback: penalty in the training step, Z/U updates, hard prune, masked fine-tune (one process)."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("lightning")

from admmcompress.plan import Plan  # noqa: E402
from admmcompress.structures import Unstructured  # noqa: E402
from admmcompress.train.lightning import ADMMCallback  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lightning_admm.py"
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore:ADMM residual:RuntimeWarning")


def _example():
    spec = importlib.util.spec_from_file_location("lightning_admm", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lightning_example_prunes_to_the_plan_and_logs_the_admm_state(tmp_path):
    result = _example().main(limit=512, admm_epochs=2, finetune_epochs=1, log_dir=str(tmp_path))
    # fc1 20x, fc2 10x, fc3 4x: 11,760 + 3,000 + 250 = 15,010 of 266,200 weights kept, held through fine-tuning
    assert result["compression"] == pytest.approx(266200 / 15010, abs=1e-9)
    assert result["masks_hold"]
    rows = list(csv.DictReader(open(Path(result["log"]) / "metrics.csv")))
    epochs = [r for r in rows if r.get("admm/rho")]
    assert [float(r["admm/rho"]) for r in epochs] == pytest.approx([1.3e-3, 1.69e-3])  # rho x1.3 per update
    assert all(0 <= float(r["admm/residual/fc1.weight:unstructured"]) for r in epochs)


def test_callback_refuses_bad_settings_in_one_line():
    plan = Plan({"fc1": Unstructured(compression=2)})
    with pytest.raises(ValueError, match="admm_epochs=0 must be an integer >= 1"):
        ADMMCallback(plan, admm_epochs=0)
    with pytest.raises(ValueError, match="not both"):
        ADMMCallback(plan, admm_epochs=1, update_every_epochs=1, update_every_steps=5)
    with pytest.raises(ValueError, match="method='nope'; choose one of"):
        ADMMCallback(plan, admm_epochs=1, method="nope")
