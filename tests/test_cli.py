"""The command line: a tiny end-to-end run, its report, user errors, and resume after SIGKILL."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from admmcompress.cli import main
from admmcompress.train.runner import STATE_FILE

pytestmark = pytest.mark.filterwarnings("ignore:ADMM residual:RuntimeWarning")

PLAN = {
    "rules": [
        {"match": "fc1", "structure": "unstructured", "sparsity": 0.9},
        {"match": "fc2", "structure": "filter", "sparsity": 0.5},
    ]
}


def tiny_spec(**overrides) -> dict:
    spec = {
        "name": "tiny",
        "seed": 1,
        "threads": 1,
        "model": {"name": "lenet300100"},
        "data": {"dataset": "mnist", "batch_size": 64, "train_limit": 512, "test_limit": 200},
        "pretrain": {"epochs": 1},
        "stages": [
            {"plan": PLAN, "method": "admm", "admm": {"epochs": 2, "rho": 1.0e-2}, "retrain": {"epochs": 1}}
        ],
    }
    spec.update(overrides)
    return spec


def write_config(tmp_path: Path, spec: dict, name: str = "tiny.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path




@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One tiny run through the CLI, shared by the checks on its outputs."""
    tmp_path = tmp_path_factory.mktemp("cli")
    config = write_config(tmp_path, tiny_spec())
    out = tmp_path / "out"
    code = main(["run", str(config), "--out", str(out), "--no-progress"])
    return code, config, out


def test_run_writes_model_masks_and_report(finished_run):
    code, _, out = finished_run
    assert code == 0
    for name in (
        "model.safetensors",
        "masks.safetensors",
        "metrics.json",
        "report.md",
        "sparsity.png",
        "training.png",
        "config.yaml",
        STATE_FILE,
    ):
        assert (out / name).is_file(), name
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    weights = load_file(str(out / "model.safetensors"))
    masks = load_file(str(out / "masks.safetensors"))
    assert set(masks) == {"fc1.weight", "fc2.weight"}
    assert int(masks["fc1.weight"].sum()) == 23520
    assert int(torch.count_nonzero(weights["fc1.weight"])) == 23520
    assert int((weights["fc2.weight"].abs().sum(1) > 0).sum()) == 50
    assert torch.all(weights["fc1.weight"][~masks["fc1.weight"]] == 0)

    report = (out / "report.md").read_text()
    assert report.startswith("# admmcompress: tiny")
    assert "| layer | type | shape | weights | kept | sparsity | compression |" in report
    assert "| fc1 | Linear | 300x784 | 235,200 | 23,520 | 90.00% | 10.0x |" in report
    assert "| fc2 | Linear | 100x300 | 30,000 | 15,000 | 50.00% | 2.0x |" in report
    overall = (235200 + 30000) / (23520 + 15000)
    assert f"Overall compression (pruned layers' weights / nonzero): **{overall:,.1f}x**" in report
    assert "Top-1 accuracy:" in report and "Wall time:" in report

    data = json.loads((out / "metrics.json").read_text())
    metrics, history = data["metrics"], data["history"]
    assert metrics["stats"]["overall_compression"] == pytest.approx(overall)
    assert len(history) == 4  # pretrain 1 + admm 2 + retrain 1
    assert len(metrics["stages"][0]["admm_history"]) == 2

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["name"] == "tiny" and saved["stages"][0]["plan"] == PLAN


def test_run_prints_the_report(tmp_path, capsys):
    config = write_config(tmp_path, tiny_spec(stages=[], pretrain={"epochs": 1}))
    assert main(["run", str(config), "--out", str(tmp_path / "dense"), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("# admmcompress: tiny")
    assert "admmcompress: run 'tiny' ->" in captured.err
    assert (tmp_path / "dense" / "model.safetensors").is_file()
    # nothing pruned: the report says so (no "inf" compression), and it round-trips through `report`
    assert "| **total (pruned layers)** | | | 0 | 0 | 0.00% | **1.0x** |" in captured.out
    assert "Overall compression (pruned layers' weights / nonzero): **1.0x**" in captured.out
    assert "Infinity" not in (tmp_path / "dense" / "metrics.json").read_text()
    assert main(["report", str(tmp_path / "dense")]) == 0
    assert capsys.readouterr().out.startswith("# admmcompress: tiny")


def test_report_recomputes_from_the_saved_weights(finished_run, capsys):
    _, _, out = finished_run
    path = out / "model.safetensors"
    original = path.read_bytes()
    try:
        weights = load_file(str(path))
        kept_rows = (weights["fc2.weight"].abs().sum(1) > 0).nonzero().flatten()
        weights["fc2.weight"][kept_rows[:25]] = 0.0  # 25 more rows gone: fc2 now keeps 25 of 100
        save_file(weights, str(path))
        assert main(["report", str(out)]) == 2  # changed after the run: refused (recorded SHA-256)
        assert "model.safetensors' does not match the SHA-256" in capsys.readouterr().err
        assert main(["report", str(out), "--rehash"]) == 0  # changed on purpose: accepted, checksums recorded anew
        printed = capsys.readouterr().out
        assert "| fc2 | Linear | 100x300 | 30,000 | 7,500 | 75.00% | 4.0x |" in printed
        assert "| fc2 | Linear | 100x300 | 30,000 | 7,500 |" in (out / "report.md").read_text()
        stats = json.loads((out / "metrics.json").read_text())["metrics"]["stats"]
        assert stats["kept_weights"] == 23520 + 7500
    finally:
        path.write_bytes(original)
        assert main(["report", str(out), "--rehash"]) == 0
    assert "| fc2 | Linear | 100x300 | 30,000 | 15,000 |" in (out / "report.md").read_text()


def test_help_works():
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0


def user_error(capsys, argv) -> str:
    """Run the CLI expecting a user error; return the error message (without the prefix)."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if not line.startswith("admmcompress: run ")]
    assert lines and lines[0].startswith("admmcompress: error: "), err
    return "\n".join(lines)[len("admmcompress: error: ") :]


def test_bad_plan_pattern_is_a_user_error(tmp_path, capsys):
    spec = tiny_spec()
    spec["stages"][0]["plan"] = {"rules": [{"match": "conv*", "structure": "unstructured", "sparsity": 0.5}]}
    message = user_error(capsys, ["run", str(write_config(tmp_path, spec)), "--out", str(tmp_path / "o")])
    assert "rule #0" in message and "matches no layer" in message and "fc1" in message


def test_bad_config_value_is_a_one_line_user_error(tmp_path, capsys):
    spec = tiny_spec()
    spec["stages"][0]["admm"]["rho"] = -1
    message = user_error(capsys, ["run", str(write_config(tmp_path, spec)), "--out", str(tmp_path / "o")])
    assert "\n" not in message and "rho=-1 must be a positive number" in message


def test_missing_config_is_a_user_error(tmp_path, capsys):
    message = user_error(capsys, ["run", str(tmp_path / "missing.yaml")])
    assert message == f"config file '{tmp_path / 'missing.yaml'}' does not exist"


def test_missing_pretrained_checkpoint_is_a_user_error(tmp_path, capsys):
    spec = tiny_spec(pretrained="nowhere/dense.safetensors")
    del spec["pretrain"]
    message = user_error(capsys, ["run", str(write_config(tmp_path, spec)), "--out", str(tmp_path / "o")])
    assert "dense.safetensors" in message and "does not exist" in message


def test_existing_run_needs_resume(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / STATE_FILE).write_bytes(b"not really a checkpoint")
    message = user_error(capsys, ["run", str(write_config(tmp_path, tiny_spec())), "--out", str(out)])
    assert "\n" not in message and "already holds a run; add --resume" in message
    assert (out / STATE_FILE).read_bytes() == b"not really a checkpoint"


def test_resume_without_checkpoint_is_a_user_error(tmp_path, capsys):
    message = user_error(
        capsys,
        [
            "run",
            str(write_config(tmp_path, tiny_spec())),
            "--out",
            str(tmp_path / "new"),
            "--resume",
            "--no-progress",
        ],
    )
    assert "\n" not in message and "--resume: no checkpoint" in message


def test_resume_without_out_is_a_user_error(tmp_path, capsys):
    message = user_error(capsys, ["run", str(write_config(tmp_path, tiny_spec())), "--resume"])
    assert "--resume needs --out" in message


def test_report_of_a_folder_without_a_run_is_a_user_error(tmp_path, capsys):
    message = user_error(capsys, ["report", str(tmp_path)])
    assert "no metrics.json" in message


def test_same_config_gives_the_same_model_in_one_process(tmp_path):
    """The config's seed fixes everything, including the initial weights of a model trained from scratch."""
    config = write_config(tmp_path, tiny_spec(stages=[]))
    assert main(["run", str(config), "--out", str(tmp_path / "a"), "--no-progress"]) == 0
    torch.randn(1000)  # whatever ran before must not matter
    assert main(["run", str(config), "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    a, b = (
        load_file(str(tmp_path / "a" / "model.safetensors")),
        load_file(str(tmp_path / "b" / "model.safetensors")),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_seed_flag_overrides_the_configs_seed_and_is_recorded(tmp_path):
    """`--seed N` runs exactly what the config with `seed: N` runs, and its config.yaml says so."""
    flagged = write_config(tmp_path, tiny_spec(stages=[]))
    edited = write_config(tmp_path, tiny_spec(stages=[], seed=7), name="seed7.yaml")
    assert main(["run", str(flagged), "--out", str(tmp_path / "a"), "--no-progress", "--seed", "7"]) == 0
    assert main(["run", str(edited), "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    assert main(["run", str(flagged), "--out", str(tmp_path / "c"), "--no-progress"]) == 0
    a, b, c = (load_file(str(tmp_path / d / "model.safetensors")) for d in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())["seed"] == 7


# --- a real kill ------------------------------------------------------------------------------
KILL_SPEC = tiny_spec(
    name="killed",
    model={"name": "lenet5"},
    data={"dataset": "mnist", "batch_size": 64, "train_limit": 1000, "test_limit": 200},
    pretrain={"epochs": 2},
    stages=[
        {
            "plan": {
                "rules": [
                    {"match": "conv*", "structure": "filter", "sparsity": 0.5},
                    {"match": "fc1", "structure": "unstructured", "sparsity": 0.9},
                ]
            },
            "admm": {"epochs": 3, "rho": 1.0e-2},
            "retrain": {"epochs": 2},
        }
    ],
)


def _read_progress(path: Path) -> tuple[int, int] | None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not there yet (it is replaced atomically, but be tolerant)
        return None
    return int(state["phase_index"]), int(state["epoch"])


def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(tmp_path):
    config = write_config(tmp_path, KILL_SPEC)
    killed = tmp_path / "killed"
    log = (tmp_path / "child.log").open("w")
    child = subprocess.Popen(
        [sys.executable, "-m", "admmcompress.cli", "run", str(config), "--out", str(killed), "--no-progress"],
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    seen = None
    try:
        deadline = time.monotonic() + 120
        last_mtime = None
        while True:
            assert child.poll() is None, (
                f"the run ended before it could be killed (at {seen}); make it longer"
            )
            assert time.monotonic() < deadline, f"no checkpoint past the pretrain phase in time (last {seen})"
            try:
                mtime = (killed / STATE_FILE).stat().st_mtime_ns
            except FileNotFoundError:
                mtime = None
            if mtime is not None and mtime != last_mtime:
                last_mtime = mtime
                seen = _read_progress(killed / STATE_FILE) or seen
                if seen is not None and seen >= (1, 1):  # ADMM phase, at least one epoch done
                    break
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        log.close()
    assert (1, 1) <= seen < (3, 0)  # killed in the ADMM phase or in retraining, never after the end
    assert not (killed / "model.safetensors").exists()

    assert main(["run", str(config), "--out", str(killed), "--resume", "--no-progress"]) == 0
    reference = tmp_path / "reference"
    assert main(["run", str(config), "--out", str(reference), "--no-progress"]) == 0

    for name in ("model.safetensors", "masks.safetensors"):
        got, want = load_file(str(killed / name)), load_file(str(reference / name))
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), f"{name}:{key} differs after kill + resume"
    got = json.loads((killed / "metrics.json").read_text())["metrics"]
    want = json.loads((reference / "metrics.json").read_text())["metrics"]
    assert got["accuracy_after"] == want["accuracy_after"]
    assert got["stats"] == want["stats"]
