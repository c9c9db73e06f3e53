"""benchmarks/lenet5_published_rates.py and its configs: the chain runs (one epoch per phase), the table reads it."""

import json
from pathlib import Path

import pytest
import yaml

from admmcompress.data import load_dataset
from admmcompress.models import create_model
from admmcompress.train import checkpoint as ckpt
from admmcompress.train.config import RunConfig
from admmcompress.train.runner import Runner

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.filterwarnings("ignore:ADMM residual:RuntimeWarning")


@pytest.fixture()
def bench(load_benchmark):
    return load_benchmark("lenet5_published_rates")


def shortened(path: Path, **changes) -> RunConfig:
    """The ready config with every phase cut to one epoch (and an update every 2 steps)."""
    spec = yaml.safe_load(path.read_text())
    spec.update(changes)
    for stage in spec["stages"]:
        stage["admm"].update(epochs=1, update_every_steps=2)
        stage["retrain"]["epochs"] = 1
    return RunConfig.from_dict(spec, base_dir=path.parent)


def run(config: RunConfig, out: Path, data) -> dict:
    model = create_model(**config.model)
    ckpt.load_weights(model, config.pretrained)
    return Runner(config, model, *data, out_dir=out, progress=False, train_dense=False).run()


def test_progressive_chain_keeps_each_step_and_quantization_continues_from_step_4(bench, tmp_path):
    data = load_dataset("mnist", "train", limit=256), load_dataset("mnist", "test", limit=200)
    out = tmp_path / "progressive_s0"
    metrics = run(shortened(bench.PROGRESSIVE), out, data)
    rates = [s["overall_compression"] for s in metrics["stages"]]
    assert [round(r, 1) for r in rates[2:]] == [124.8, 176.0, 246.0, 348.0]  # the published rows are steps 5, 6
    start = out / "stages" / "stage4.safetensors"
    assert all((out / "stages" / f"stage{i}.safetensors").is_file() for i in range(1, 7))
    with pytest.raises(SystemExit, match="stage4.safetensors is missing; run --only progressive --seeds 1 first"):
        bench.quantize(1, 1, tmp_path)
    quant = run(shortened(bench.QUANTIZE, pretrained=str(start)), tmp_path / "quantize176_s0", data)
    storage = quant["storage"]
    assert storage["weight_reduction"] == pytest.approx(176.0, rel=1e-3)  # the step-4 zeros stayed zero
    assert storage["paper_reduction"] > 2000 > storage["storage_reduction"]["best"]
    # as `admmcompress run` writes metrics.json: the metrics under "metrics", beside the history
    (out / "metrics.json").write_text(json.dumps({"metrics": metrics, "history": []}))
    (tmp_path / "quantize176_s0" / "metrics.json").write_text(json.dumps({"metrics": quant, "history": []}))
    table = bench.summary(tmp_path)
    assert "| progressive ADMM, step 5 | 246x (almost) no loss | 246.0x |" in table
    assert "| progressive ADMM, step 6 | 348x (almost) no loss | 348.0x |" in table
    assert "176x pruning + 4/3/2/3-bit ADMM quantization" in table


def test_a_finished_part_is_not_run_again(bench, tmp_path, monkeypatch):
    (tmp_path / "progressive_s0").mkdir()
    (tmp_path / "progressive_s0" / "metrics.json").write_text("{}")
    monkeypatch.setattr(bench.subprocess, "run", lambda *a, **k: pytest.fail("ran a finished part"))
    bench.progressive(0, 1, tmp_path)
