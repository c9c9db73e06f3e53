"""metrics.json is standard JSON even when a figure is infinite or NaN (an all-pruned layer's compression, a loss
that overflowed): those are written as the strings "inf", "-inf" and "nan", the spelling of compare's summary.json,
and read back as floats. Runs written before, with a bare ``Infinity`` and the checksum of that time, still verify.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest

from admmcompress.cli import main
from admmcompress.executors.manifest import canonical_sha256
from admmcompress.report.integrity import RunIntegrityError, record_output_checksums, verify_run
from admmcompress.report.render import load_report, save_report
from admmcompress.train import checkpoint as ckpt

pytestmark = pytest.mark.filterwarnings("ignore:ADMM residual:RuntimeWarning")

INF, NAN = float("inf"), float("nan")


def strict_json(text: str) -> Any:
    """What a strict reader (JavaScript's JSON.parse, jq) makes of ``text``: a bare Infinity or NaN fails."""

    def refuse(token: str) -> Any:
        raise AssertionError(f"metrics.json holds the bare {token}, which is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture
def run(tiny_finished_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(tiny_finished_run, copy)
    return copy


def with_nonfinite_figures(metrics: dict[str, Any], history: list[dict[str, Any]]) -> None:
    """An all-pruned stage (infinite compression) and a loss that overflowed, in place."""
    metrics["stages"][0]["overall_compression"] = INF
    metrics["stages"][0]["layers"]["fc1"] = -INF
    history[0]["loss"] = NAN


def old_style_metrics(run: Path) -> dict[str, Any]:
    """The run's metrics.json as runs wrote it before: non-finite floats as bare tokens, and a content checksum
    over them (the JSON of metrics and history, the record without its own value), written as it was then."""
    data = json.loads((run / "metrics.json").read_text())
    with_nonfinite_figures(data["metrics"], data["history"])
    record = {k: v for k, v in data["metrics"]["integrity"].items() if k != "content"}
    content = {"metrics": {**data["metrics"], "integrity": record}, "history": data["history"]}
    data["metrics"]["integrity"]["content"] = canonical_sha256(json.loads(json.dumps(content, default=str)))
    (run / "metrics.json").write_text(json.dumps(data, indent=2))
    return data


def test_infinite_and_nan_figures_are_written_as_standard_json_and_read_back(run):
    metrics, history = load_report(run)
    with_nonfinite_figures(metrics, history)
    save_report(run, metrics, history, "all pruned")
    record_output_checksums(run)  # what `admmcompress run` does last: rewrites metrics.json with the record
    data = strict_json((run / "metrics.json").read_text())
    stage = data["metrics"]["stages"][0]
    assert (stage["overall_compression"], stage["layers"]["fc1"], data["history"][0]["loss"]) == ("inf", "-inf", "nan")
    assert verify_run(run) == []
    metrics, history = load_report(run)  # the figures come back as the floats the run measured
    assert metrics["stages"][0]["overall_compression"] == INF and metrics["stages"][0]["layers"]["fc1"] == -INF
    assert math.isnan(history[0]["loss"])


def test_a_changed_spelled_figure_still_fails_verification(run):
    metrics, history = load_report(run)
    with_nonfinite_figures(metrics, history)
    save_report(run, metrics, history, "all pruned")
    record_output_checksums(run)
    path = run / "metrics.json"
    data = strict_json(path.read_text())
    data["metrics"]["stages"][0]["overall_compression"] = "nan"  # another value, in the same spelling
    path.write_text(json.dumps(data, indent=2))
    with pytest.raises(RunIntegrityError, match="does not match the checksum recorded in it"):
        verify_run(run)


def test_a_run_written_with_bare_infinity_and_the_old_checksum_still_verifies_and_reports(run, capsys):
    old_style_metrics(run)
    assert "Infinity" in (run / "metrics.json").read_text() and "NaN" in (run / "metrics.json").read_text()
    assert verify_run(run) == []
    assert main(["report", str(run)]) == 0
    assert "| 1 | inf |" in capsys.readouterr().out  # the stage's infinite compression, shown
    strict_json((run / "metrics.json").read_text())  # report rewrote it, now standard, and re-sealed it
    assert verify_run(run) == []


@pytest.mark.parametrize("change", ["finite", "accuracy"])
def test_a_changed_value_in_an_old_style_file_fails_verification(run, change):
    data = old_style_metrics(run)
    if change == "finite":
        data["metrics"]["stages"][0]["overall_compression"] = 10.0  # the infinity made a number
    else:
        data["metrics"]["accuracy_after"] += 1.0
    (run / "metrics.json").write_text(json.dumps(data, indent=2))
    with pytest.raises(RunIntegrityError, match="does not match the checksum recorded in it"):
        verify_run(run)


def test_report_on_a_run_with_an_all_pruned_layer_writes_standard_json_and_reads_it_again(run, capsys):
    weights = ckpt.load_tensors(run / "model.safetensors")
    weights["fc1.weight"].zero_()  # every weight of the one pruned layer pruned, on purpose
    shape, count = "x".join(map(str, weights["fc1.weight"].shape)), weights["fc1.weight"].numel()
    ckpt.save_tensors(run / "model.safetensors", weights)
    assert main(["report", str(run), "--rehash"]) == 0
    stats = strict_json((run / "metrics.json").read_text())["metrics"]["stats"]
    assert stats["overall_compression"] == "inf" and stats["layers"][0]["compression"] == "inf"
    capsys.readouterr()
    assert main(["report", str(run)]) == 0  # re-reads the infinite figures, verifies and re-seals
    assert f"| fc1 | Linear | {shape} | {count:,} | 0 | 100.00% | inf |" in capsys.readouterr().out
    strict_json((run / "metrics.json").read_text())
    assert verify_run(run) == []
