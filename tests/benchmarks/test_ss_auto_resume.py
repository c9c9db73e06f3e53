"""benchmarks/ss_auto.py resumes: a run trained before is only timed, a run timed before is skipped."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from admmcompress.finalize import hard_prune
from admmcompress.models import create_model
from admmcompress.plan import Plan, Rule
from admmcompress.structures import Filter
from admmcompress.train import checkpoint as ckpt


@pytest.fixture()
def ss_auto(load_benchmark):
    return load_benchmark("ss_auto")


def trained_before(ss_auto, out, method: str) -> dict:
    """A quick run's record and saved model, as a seed cut short after training leaves them."""
    torch.manual_seed(0)
    model = create_model("lenet5", dropout=0.0).eval()
    masks = hard_prune(model, Plan([Rule(Filter(sparsity=0.5), match="conv2")]).resolve(model))
    record = {"model": "lenet5", "method": method, "reduction": 2.0, "seed": 0, "quick": True, "weighting": "sqrt",
              "soft_rho_growth": 1.0 if method == "auto" else None, "accuracy": 97.5, "macs_dense": 2,
              "macs_compacted": 1, "wall_seconds": 1.0, "share_soft_threshold": 1.0}
    weights_file, masks_file = ss_auto.model_files(out / "lenet5", record)
    weights_file.parent.mkdir(parents=True, exist_ok=True)
    ckpt.save_tensors(weights_file, model.state_dict())
    ckpt.save_tensors(masks_file, masks.state_dict())
    with open(out / "lenet5" / "runs_partial.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")
    return record


def run_main(ss_auto, monkeypatch, out, methods: list[str]) -> None:
    monkeypatch.setattr(ss_auto, "ensure_malloc_env", lambda: None)  # it would re-execute pytest
    monkeypatch.setattr(sys, "argv", ["ss_auto.py", "--model", "lenet5", "--quick", "--reductions", "2",
                                      "--seeds", "0", "--threads", "1", "--out", str(out), "--methods", *methods])
    threads = torch.get_num_threads()
    try:
        ss_auto.main()
    finally:
        torch.set_num_threads(threads)  # main() sets it for the process; later tests keep theirs


def test_a_trained_run_is_timed_without_training_and_then_skipped(ss_auto, tmp_path, monkeypatch):
    trained_before(ss_auto, tmp_path, "uniform")
    trained_before(ss_auto, tmp_path, "auto")

    def no_training(*args, **kwargs):
        raise AssertionError("a run trained before was trained again")

    monkeypatch.setattr(ss_auto, "one_run", no_training)
    run_main(ss_auto, monkeypatch, tmp_path, ["uniform", "auto"])
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert sorted(r["method"] for r in rows) == ["auto", "uniform"]
    assert all(r["accuracy"] == 97.5 and r["latency_ms"] > 0 and r["dense_latency_ms"] > 0 for r in rows)
    run_main(ss_auto, monkeypatch, tmp_path, ["uniform", "auto"])  # everything timed: nothing runs again
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 2


def test_another_recipe_is_not_taken_for_a_finished_run(ss_auto, tmp_path):
    """auto with a growing rho, or another weighting, is a different run from the one recorded."""
    record = trained_before(ss_auto, tmp_path, "auto")
    timed, partial = ss_auto.earlier_runs(tmp_path, tmp_path / "lenet5")
    assert not timed and ss_auto.run_key(record) in partial
    assert ss_auto.run_key({**record, "soft_rho_growth": 1.3}) not in partial
    assert ss_auto.run_key({**record, "weighting": "cost"}) not in partial
    assert ss_auto.run_key({**record, "quick": False}) not in partial


def test_a_run_whose_model_is_missing_is_run_again(ss_auto, tmp_path):
    record = trained_before(ss_auto, tmp_path, "uniform")
    for f in ss_auto.model_files(tmp_path / "lenet5", record):
        f.unlink()
    assert ss_auto.run_key(record) not in ss_auto.earlier_runs(tmp_path, tmp_path / "lenet5")[1]


def test_other_epochs_or_weighting_are_other_runs_with_their_own_files(ss_auto, tmp_path):
    record = {"model": "resnet20", "method": "auto", "reduction": 4.0, "seed": 0, "quick": False,
              "weighting": "sqrt", "soft_rho_growth": 1.0}
    old = dict(record)  # written before epochs were recorded: the setup's 3 + 3
    now = {**record, "epochs": [3, 3], "every": 88}
    assert ss_auto.run_key(old) == ss_auto.run_key(now)
    assert ss_auto.run_key({**now, "epochs": [30, 30]}) != ss_auto.run_key(now)
    files = {ss_auto.model_files(tmp_path, r)[0].name for r in (now, {**now, "epochs": [30, 30]},
                                                                  {**now, "weighting": "cost"})}
    assert len(files) == 3 and ss_auto.model_files(tmp_path, old)[0].name == "resnet20_4x_seed0_auto.safetensors"


def test_another_precision_is_its_own_row_run_and_files(ss_auto, tmp_path):
    record = {"model": "resnet20", "method": "uniform", "reduction": 4.0, "seed": 0, "quick": False,
              "weighting": "sqrt", "soft_rho_growth": None, "epochs": [3, 3], "every": 88}
    bf16, fp32 = {**record, "precision": "bf16"}, {**record, "precision": "fp32"}
    assert ss_auto.run_key(record) == ss_auto.run_key(bf16)  # older records: the setup's bf16
    assert ss_auto.run_key(fp32) != ss_auto.run_key(bf16)
    assert ss_auto.label(fp32) == "uniform_fp32" and ss_auto.label(bf16) == "uniform"
    assert ss_auto.model_files(tmp_path, fp32)[0].name == "resnet20_4x_seed0_uniform_fp32.safetensors"
    assert ss_auto.label({**record, "model": "lenet5", "precision": "fp32"}) == "uniform"  # LeNet-5's default
    rows = [{**r, "accuracy": a, "macs_dense": 4, "macs_compacted": 1, "wall_seconds": 1.0, "latency_ms": 1.0}
            for r, a in ((fp32, 80.0), (bf16, 70.0), ({**fp32, "method": "tp_global"}, 75.0))]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    quiet = {"model": "resnet20", "reduction": 4.0, "seed": 0, "method": "uniform_fp32", "latency_ms": 0.5,
             "dense_latency_ms": 2.0}  # what --retime writes: the row's label
    (tmp_path / "retimed.jsonl").write_text(json.dumps(quiet) + "\n")
    table = ss_auto.summarize(tmp_path)
    lines = [line.split(" | ") for line in table.splitlines() if line.startswith("| 4x")]
    assert [cells[1] for cells in lines] == ["uniform", "uniform_fp32", "tp_global_fp32"]
    assert [cells[5] for cells in lines] == ["-", "0.500 (2.000)", "-"]  # the quiet latency of its own row only
