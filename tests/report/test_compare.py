"""`admmcompress report --compare`: one table and one PNG across two tiny finished runs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from admmcompress.cli import main
from admmcompress.report.compare import RunSummary, compare_runs, compare_table, load_summary, save_summary

pytestmark = pytest.mark.filterwarnings("ignore:ADMM residual:RuntimeWarning")


def tiny_spec(name: str, method: str, plan: dict, **extra) -> dict:
    stage = {"plan": plan, "method": method, "admm": {"epochs": 1, "update_every_steps": 2}, "retrain": {"epochs": 1}}
    return {
        "name": name,
        "seed": 1,
        "threads": 1,
        "model": {"name": "lenet300100"},
        "data": {"dataset": "mnist", "batch_size": 64, "train_limit": 256, "test_limit": 100},
        "pretrain": {"epochs": 1},
        "stages": [stage],
        **extra,
    }


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> list[Path]:
    """An ADMM run and a gradual-magnitude run with compaction, both through `admmcompress run`."""
    threads = torch.get_num_threads()
    root = tmp_path_factory.mktemp("compare")
    specs = [
        tiny_spec("tiny-admm", "admm", {"rules": [{"match": "fc1", "structure": "unstructured", "sparsity": 0.9}]}),
        tiny_spec("tiny-gradual", "gradual", {"rules": [{"match": "fc1", "structure": "filter", "sparsity": 0.5}]},
                  compact=True),
    ]
    folders = []
    for spec in specs:
        config = root / f"{spec['name']}.yaml"
        config.write_text(yaml.safe_dump(spec, sort_keys=False))
        out = root / spec["name"]
        assert main(["run", str(config), "--out", str(out), "--no-progress"]) == 0
        folders.append(out)
    torch.set_num_threads(threads)
    return folders


def test_summary_reads_metrics_and_config(two_runs):
    admm, gradual = (load_summary(f) for f in two_runs)
    metrics = json.loads((two_runs[0] / "metrics.json").read_text())["metrics"]
    assert (admm.name, admm.method, gradual.name, gradual.method) == ("tiny-admm", "admm", "tiny-gradual", "gradual")
    assert admm.compression == pytest.approx(metrics["stats"]["overall_compression"])
    assert admm.accuracy_after == metrics["accuracy_after"] and admm.accuracy_before == metrics["accuracy_before"]
    assert admm.storage_reduction == pytest.approx(metrics["storage"]["storage_reduction"]["best"])
    assert admm.wall_seconds == pytest.approx(metrics["wall_seconds"])
    assert admm.params_after is None and gradual.params_after is not None and gradual.macs_after is not None
    assert gradual.params_after < sum(p.numel() for p in torch.nn.Linear(784, 300).parameters()) + 30_000
    assert gradual.compression == pytest.approx(2.0, rel=0.01)


def test_cli_prints_one_table_and_writes_the_png_next_to_out(two_runs, tmp_path, capsys):
    out = tmp_path / "tables" / "compare.md"
    assert main(["report", "--compare", *map(str, two_runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    table = out.read_text()
    assert table.strip() in printed
    lines = table.strip().splitlines()
    assert lines[0] == (
        "| run | method | compression | accuracy before | accuracy after | change | acc. after hard prune | "
        "storage reduction | params after compaction | MACs after compaction | wall time |"
    )
    assert len(lines) == 4 and lines[2].startswith("| tiny-admm | admm | 10.0x |")
    assert lines[3].startswith("| tiny-gradual | gradual | 2.0x |") and "| - | - |" in lines[2]
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_out_the_png_goes_to_the_current_folder(two_runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = compare_runs(two_runs)
    assert "(plot in compare.png)" in text and (tmp_path / "compare.png").is_file()


def test_runs_with_the_same_name_are_told_apart_by_folder():
    a = RunSummary("lenet5", "seed0", "admm", 10.0, 99.0, 98.0)
    b = RunSummary("lenet5", "seed1", "admm", 10.0, 99.0, 98.5)
    rows = compare_table([a, b]).splitlines()[2:]
    assert rows[0].startswith("| lenet5 (seed0) |") and rows[1].startswith("| lenet5 (seed1) |")


def test_infinite_compression_and_missing_figures(tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "metrics.json").write_text(json.dumps({"metrics": {"stats": {"overall_compression": "inf"}}}))
    summary = load_summary(folder)  # no config.yaml: the folder names it; no stages: dense
    assert (summary.name, summary.method, summary.compression) == ("old", "dense", float("inf"))
    assert compare_table([summary]).splitlines()[2] == "| old | dense | inf | - | - | - | - | - |"


def test_wrong_inputs_get_one_clear_line(two_runs, tmp_path, capsys):
    assert main(["report", "--compare", str(tmp_path / "missing")]) == 2
    assert "no metrics.json in" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.json").write_text("[]")
    assert main(["report", "--compare", str(bad)]) == 2
    assert "is not a run's metrics.json" in capsys.readouterr().err
    assert main(["report", "--compare", str(two_runs[0]), "--out", str(tmp_path / "table.txt")]) == 2
    assert "ending in .md" in capsys.readouterr().err
    assert main(["report", str(two_runs[0]), "--compare", str(two_runs[1])]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["report"]) == 2
    assert "give a run folder, or --compare" in capsys.readouterr().err
    assert main(["report", str(two_runs[0]), "--out", str(tmp_path / "x.md")]) == 2
    assert "--out goes with --compare" in capsys.readouterr().err
    with pytest.raises(ValueError, match="at least one run folder"):
        compare_table([])


def test_results_made_outside_the_runner_join_through_summary_json(two_runs, tmp_path, capsys):
    baseline = RunSummary("L1 baseline", "l1", "magnitude (Torch-Pruning)", 4.0, 99.0, 98.2, params_after=1234,
                          extra={"keep": 0.5})
    save_summary(baseline, tmp_path / "l1")
    assert load_summary(tmp_path / "l1") == baseline
    assert main(["report", "--compare", str(two_runs[0]), str(tmp_path / "l1"), "--out", str(tmp_path / "t.md")]) == 0
    last = capsys.readouterr().out.split("\n\n")[0].splitlines()[-1]
    assert last.startswith("| L1 baseline | magnitude (Torch-Pruning) | 4.0x | 99.00% | 98.20% | -0.80 |")
    assert compare_table([baseline], extra_columns=["keep"]).splitlines()[2].startswith(
        "| L1 baseline | magnitude (Torch-Pruning) | 0.5 | 4.0x |"
    )
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "summary.json").write_text('{"nam": 1}')
    with pytest.raises(ValueError, match="is not a summary written by save_summary"):
        load_summary(tmp_path / "broken")


@pytest.mark.parametrize(
    ("entry", "named"),
    [
        ({"accuracy_after": "high"}, "accuracy_after = 'high', not a number"),
        ({"compression": [4]}, "compression = [4], not a number"),
        ({"wall_seconds": True}, "wall_seconds = True, not a number"),
        ({"params_after": 12.5}, "params_after = 12.5, not a whole number"),
        ({"name": 7}, "name = 7"),
        ({"extra": [1]}, "extra = [1], not an object"),
    ],
)
def test_a_summary_with_wrong_types_is_one_line_not_a_crash_of_the_table(tmp_path, capsys, entry, named):
    fields = {"name": "x", "folder": "x", "method": "magnitude", "accuracy_after": 90.0, **entry}
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "summary.json").write_text(json.dumps(fields))
    with pytest.raises(ValueError, match=f"holds {re.escape(named)}"):
        load_summary(tmp_path / "x")
    assert main(["report", "--compare", str(tmp_path / "x")]) == 2
    assert "write it with save_summary" in capsys.readouterr().err


def test_an_infinite_figure_is_saved_as_standard_json_and_read_back(tmp_path):
    summary = RunSummary("all pruned", "p", "admm", float("inf"), 99.0, 10.0, storage_reduction=float("inf"))
    save_summary(summary, tmp_path / "p")
    text = (tmp_path / "p" / "summary.json").read_text()
    json.loads(text, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
    assert load_summary(tmp_path / "p") == summary


def test_runs_of_different_models_or_splits_get_a_caveat_under_the_table(tmp_path, capsys):
    def run(name: str, model: str, evaluated_on: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        metrics = {"accuracy_after": 90.0, "evaluated_on": evaluated_on}
        (folder / "metrics.json").write_text(json.dumps({"metrics": metrics}))
        (folder / "config.yaml").write_text(yaml.safe_dump({"name": name, "model": {"name": model},
                                                            "data": {"dataset": "mnist"}}))
        return folder

    a, b, c = run("a", "lenet5", "test"), run("b", "lenet5", "test"), run("c", "lenet300", "validation")
    assert load_summary(a).extra == {"model": "lenet5", "dataset": "mnist", "evaluated_on": "test"}
    assert "note:" not in compare_runs([a, b], tmp_path / "ab.md")
    text = compare_runs([a, b, c], tmp_path / "abc.md")
    note = ("note: the runs differ in model (lenet5, lenet300); evaluated on (test, validation); their accuracies "
            "do not compare directly")
    assert note in text and note in (tmp_path / "abc.md").read_text()
    assert main(["report", "--compare", str(a), str(c), "--out", str(tmp_path / "ac.md")]) == 0
    assert "their accuracies do not compare directly" in capsys.readouterr().out
