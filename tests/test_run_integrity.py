"""A finished run's outputs carry SHA-256 checksums in metrics.json; `report` and `export` verify them.

A changed byte in model.safetensors, masks.safetensors, the compact/ files or metrics.json is refused with one
line naming the file (exit status 2); a pruned weight made nonzero is refused even with fresh checksums, and so is
a missing output or an unreadable compacted model under --rehash; runs
written before checksums still report and export, with a note; `report` on a read-only run folder prints the
report and says it could not save it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from admmcompress.cli import main
from admmcompress.executors.manifest import canonical_sha256
from admmcompress.report import render
from admmcompress.report.integrity import CHECKED_FILES, file_sha256, seal, verify_run
from admmcompress.train import checkpoint as ckpt

pytestmark = pytest.mark.filterwarnings("ignore:ADMM residual:RuntimeWarning")

SPEC = {
    "name": "integrity",
    "seed": 3,
    "threads": 1,
    "model": {"name": "lenet300100"},
    "data": {"dataset": "mnist", "batch_size": 64, "train_limit": 256, "test_limit": 128},
    "pretrain": {"epochs": 1},
    "compact": True,
    "stages": [
        {
            "plan": {"rules": [{"match": "fc1", "structure": "filter", "sparsity": 0.5},
                               {"match": "fc2", "structure": "unstructured", "sparsity": 0.8}]},
            "method": "admm",
            "admm": {"epochs": 1, "rho": 1.0e-2},
            "retrain": {"epochs": 1},
        }
    ],
}




@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """One tiny run (with compaction) through the CLI; tests work on copies of its folder."""
    tmp = tmp_path_factory.mktemp("integrity")
    config = tmp / "run.yaml"
    config.write_text(yaml.safe_dump(SPEC, sort_keys=False))
    out = tmp / "out"
    assert main(["run", str(config), "--out", str(out), "--no-progress"]) == 0
    return out


@pytest.fixture
def run(finished, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy


def error_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("admmcompress: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_a_run_records_the_checksums_of_its_outputs(finished):
    record = json.loads((finished / "metrics.json").read_text())["metrics"]["integrity"]
    assert record["algorithm"] == "sha256"
    assert set(record["files"]) == set(CHECKED_FILES)  # weights, masks and the compacted model
    for name, digest in record["files"].items():
        assert file_sha256(finished / name) == digest
    assert len(record["content"]) == 64 and verify_run(finished) == []


def test_report_and_export_refuse_a_changed_weight_file(run, capsys, tmp_path):
    path = run / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10  # one bit of the last weights
    path.write_bytes(bytes(data))
    report_md = (run / "report.md").read_text()
    err = error_line(capsys, ["report", str(run)])
    assert f"'{path}' does not match the SHA-256 recorded when the run finished" in err
    assert (run / "report.md").read_text() == report_md  # nothing rewritten with wrong figures
    for flag in ("--packed", "--compact"):
        err = error_line(capsys, ["export", flag, str(run), "--out", str(tmp_path / "x")])
        assert "model.safetensors' does not match the SHA-256" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name", ["masks.safetensors", "compact/model.safetensors", "compact/manifest.json"])
def test_every_recorded_output_is_verified(run, capsys, name):
    path = run / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert f"'{path}' does not match the SHA-256" in error_line(capsys, ["report", str(run)])
    path.unlink()
    assert f"'{path}' is missing" in error_line(capsys, ["report", str(run)])


def test_a_changed_metrics_value_is_refused(run, capsys):
    path = run / "metrics.json"
    data = json.loads(path.read_text())
    data["metrics"]["accuracy_after"] += 1.0
    path.write_text(json.dumps(data, indent=2))
    err = error_line(capsys, ["report", str(run)])
    assert f"'{path}' does not match the checksum recorded in it" in err
    path.write_text(json.dumps(json.loads(path.read_text()), indent=4))  # re-indented: the changed value still is
    assert "does not match the checksum recorded in it" in error_line(capsys, ["report", str(run)])
    data["metrics"]["accuracy_after"] -= 1.0
    path.write_text(json.dumps(data, indent=4))  # the original values, re-indented: accepted
    assert main(["report", str(run)]) == 0


def test_report_keeps_the_run_verifiable_and_rehash_accepts_deliberate_changes(run, capsys):
    assert main(["report", str(run)]) == 0 and main(["report", str(run)]) == 0  # re-sealed each time
    assert verify_run(run) == []
    weights = ckpt.load_tensors(run / "model.safetensors")
    kept = (weights["fc2.weight"] != 0).nonzero()[:10]
    weights["fc2.weight"][kept[:, 0], kept[:, 1]] = 0.0  # ten more weights pruned, on purpose
    ckpt.save_tensors(run / "model.safetensors", weights)
    error_line(capsys, ["report", str(run)])
    assert main(["report", str(run), "--rehash"]) == 0
    assert verify_run(run) == []  # new checksums recorded


def test_a_revived_pruned_weight_is_refused_even_after_rehash(run, capsys):
    weights = ckpt.load_tensors(run / "model.safetensors")
    masks = ckpt.load_tensors(run / "masks.safetensors")
    row, col = (~masks["fc2.weight"]).nonzero()[0].tolist()
    weights["fc2.weight"][row, col] = 0.5
    ckpt.save_tensors(run / "model.safetensors", weights)
    err = error_line(capsys, ["report", str(run), "--rehash"])
    assert "1 weights of 'fc2.weight' that masks.safetensors prunes are not zero" in err


def test_runs_written_before_checksums_still_report_and_export(run, capsys, tmp_path):
    path = run / "metrics.json"
    data = json.loads(path.read_text())
    del data["metrics"]["integrity"]
    path.write_text(json.dumps(data, indent=2))
    assert main(["report", str(run)]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("# admmcompress: integrity")
    assert "admmcompress: note: " in captured.err and "written before runs recorded checksums" in captured.err
    assert "integrity" not in json.loads(path.read_text())["metrics"]  # an old run is not blessed silently
    assert main(["export", "--packed", str(run), "--out", str(tmp_path / "m.apk")]) == 0
    assert "written before runs recorded checksums" in capsys.readouterr().err


def test_report_on_a_read_only_run_folder_prints_the_report(run, capsys, monkeypatch):
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}

    def refuse(path, write):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(render, "atomic_write", refuse)  # what a read-only folder does (tests may run as root)
    assert main(["report", str(run)]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("# admmcompress: integrity") and "| fc1 | Linear |" in captured.out
    assert f"could not save the report into '{run}'" in captured.err and "printed only" in captured.err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_report_on_a_truly_read_only_folder(run, capsys):
    run.chmod(0o555)
    try:
        assert main(["report", str(run)]) == 0
        assert "could not save the report" in capsys.readouterr().err
    finally:
        run.chmod(0o755)


def test_a_changed_config_value_is_refused_but_comments_and_layout_are_not(run, capsys, tmp_path):
    path = run / "config.yaml"
    record = json.loads((run / "metrics.json").read_text())["metrics"]["integrity"]
    assert len(record["config"]) == 64  # the run recorded its config's values
    original = path.read_text()
    moved = yaml.safe_load(original)
    moved["data"]["data_dir"], moved["plugins"], moved["threads"] = "/elsewhere/data", ["my_plugin.py"], 2
    moved["distributed"]["check_ranks"] = True  # every key --resume takes as a speed key is left out too
    path.write_text("# a note of mine\n" + yaml.safe_dump(moved, indent=4))
    assert verify_run(run) == []  # same values, other layout and locations (a moved folder): accepted
    spec = yaml.safe_load(original)
    spec["model"]["hidden"] = [500, 100]  # report and export would rebuild another model
    path.write_text(yaml.safe_dump(spec))
    err = error_line(capsys, ["report", str(run)])
    assert f"'{path}' holds other values than the run was made with" in err and "--rehash" in err
    err = error_line(capsys, ["export", "--packed", str(run), "--out", str(tmp_path / "m.admmpk")])
    assert "holds other values than the run was made with" in err
    path.write_text(original)
    assert main(["report", str(run)]) == 0
    path.unlink()
    assert f"'{path}' is missing" in error_line(capsys, ["report", str(run)])


def test_a_run_stopped_before_recording_its_checksums_is_unfinished_and_resume_finishes_it(finished, run, capsys):
    path = run / "metrics.json"
    data = json.loads(path.read_text())
    data["metrics"]["integrity"] = {"algorithm": "sha256", "pending": True}  # as the run writes it first
    path.write_text(json.dumps(data))
    err = error_line(capsys, ["report", str(run)])
    assert "stopped while writing its final outputs" in err and "--resume" in err
    assert main(["run", str(finished.parent / "run.yaml"), "--out", str(run), "--resume", "--no-progress"]) == 0
    assert verify_run(run) == []
    assert main(["report", str(run)]) == 0


def test_report_waits_for_a_run_that_holds_the_folder(run, capsys):
    from admmcompress.train.lock import RunLock

    with RunLock(run):  # as a resumed run writing its final outputs would
        err = error_line(capsys, ["report", str(run), "--rehash"])
    assert "is being written by another admmcompress command" in err and "once it has ended" in err
    assert main(["report", str(run)]) == 0


def test_a_config_checksum_of_the_older_kind_still_verifies(run):
    # runs finished before 2026-12-06 hashed distributed.check_ranks; their record must not turn into an error
    path = run / "metrics.json"
    data = json.loads(path.read_text())
    spec = yaml.safe_load((run / "config.yaml").read_text())
    old = {k: v for k, v in spec.items() if k not in ("plugins", "threads", "logging", "pretrained", "teacher",
                                                        "checkpoint_every_epochs", "save_stages")}
    old["data"] = {k: v for k, v in old["data"].items() if k not in ("data_dir", "eval_batch_size")}
    assert "check_ranks" in old["distributed"]
    data["metrics"]["integrity"]["config"] = canonical_sha256(json.loads(json.dumps(old, default=str)))
    seal(data["metrics"], data["history"])
    path.write_text(json.dumps(data))
    assert verify_run(run) == []


def test_a_run_recorded_before_config_checksums_is_still_verified(run):
    path = run / "metrics.json"
    data = json.loads(path.read_text())
    del data["metrics"]["integrity"]["config"]
    seal(data["metrics"], data["history"])
    path.write_text(json.dumps(data))
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("seed: 3", "seed: 4"))
    assert verify_run(run) == []


# --- report --rehash still checks what the run wrote --------------------------------------------------------


@pytest.mark.parametrize("name", ["masks.safetensors", "compact/manifest.json", "compact/model.safetensors", "compact"])
def test_rehash_refuses_a_missing_output_instead_of_dropping_it_from_the_record(run, capsys, name):
    path = run / name
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    metrics = (run / "metrics.json").read_bytes()
    err = error_line(capsys, ["report", str(run), "--rehash"])
    missing = run / ("compact/manifest.json" if name == "compact" else name)
    assert f"'{missing}' is missing; the run wrote it" in err and "restore it" in err
    assert (run / "metrics.json").read_bytes() == metrics  # the old record stands: report still refuses
    assert "is missing" in error_line(capsys, ["report", str(run)])


def test_a_record_without_the_masks_does_not_pass_a_run_without_them(run, capsys):
    # a record written by a --rehash that dropped the missing masks (before this was refused)
    (run / "masks.safetensors").unlink()
    path = run / "metrics.json"
    data = json.loads(path.read_text())
    del data["metrics"]["integrity"]["files"]["masks.safetensors"]
    seal(data["metrics"], data["history"])
    path.write_text(json.dumps(data))
    assert f"'{run / 'masks.safetensors'}' is missing" in error_line(capsys, ["report", str(run)])


@pytest.mark.parametrize("text", ['{"x":', "[]"])
def test_rehash_refuses_a_compact_manifest_that_does_not_read(run, capsys, text):
    manifest = run / "compact" / "manifest.json"
    manifest.write_text(text)
    metrics = (run / "metrics.json").read_bytes()
    err = error_line(capsys, ["report", str(run), "--rehash"])
    assert err.startswith(f"admmcompress: error: '{manifest}' is not ")
    assert (run / "metrics.json").read_bytes() == metrics


def test_rehash_refuses_compacted_weights_their_manifest_does_not_record(run, capsys):
    weights = run / "compact" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))
    err = error_line(capsys, ["report", str(run), "--rehash"])
    assert f"'{weights}' is not the file" in err and "manifest.json' records" in err


@pytest.mark.parametrize("transforms", [[5], [{"method": "admm"}], [{"method": "penni", "spec": 3}], {"a": 1}])
def test_malformed_recorded_transforms_are_one_line_naming_metrics_json(transforms):
    from torch import nn

    from admmcompress.train.runner import rebuild_transforms

    with pytest.raises(ValueError, match=r"^metrics\.json: .*restore the run's metrics\.json$"):
        rebuild_transforms(nn.Linear(2, 2), transforms)


def test_a_quantized_weight_moved_off_its_recorded_levels_is_refused(tmp_path):
    import torch
    from safetensors.torch import save_file
    from torch import nn

    from admmcompress import Plan, hard_prune
    from admmcompress.report.integrity import RunIntegrityError, _check_masks
    from admmcompress.structures.quantization import FixedPoint

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6))
    masks = hard_prune(model, Plan({"0": FixedPoint(bits=3)}))
    save_file(masks.state_dict(), str(tmp_path / "masks.safetensors"))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    _check_masks(tmp_path)  # as the run wrote it
    row, col = (state["0.weight"] != 0).nonzero()[0].tolist()
    state["0.weight"][row, col] += 1e-3
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(RunIntegrityError, match="1 weights of '0.weight' are off the quantization levels"):
        _check_masks(tmp_path)
