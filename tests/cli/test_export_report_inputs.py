"""Wrong inputs to `admmcompress export` and `report --compare`: one line naming the problem and the fix.

Nothing the user has is replaced: an existing --out (file or folder) is refused before the run is read, so are
`report --compare`'s existing table and plot; a run folder without metrics.json cannot be verified and is
refused; a run's damaged config.yaml or metrics.json is named in the message.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from admmcompress import run_export
from admmcompress.cli import main
from admmcompress.executors import get_executor
from admmcompress.report.compare import compare_runs
from admmcompress.report.integrity import seal

pytestmark = pytest.mark.filterwarnings("ignore:ADMM residual:RuntimeWarning")

@pytest.fixture
def finished(tiny_finished_run) -> Path:
    """The session's tiny finished run (tests/conftest.py); tests that change it work on copies."""
    return tiny_finished_run


@pytest.fixture
def run(finished, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy


def error_line(capsys, argv: list[str]) -> str:
    """The command's one stderr line (exit status 2, no traceback)."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("admmcompress: error: "), err
    return err[0].removeprefix("admmcompress: error: ")


# --- export --out -----------------------------------------------------------------------------------------


def test_compact_out_that_is_a_file_is_refused_before_any_work(finished, tmp_path, capsys, no_run_read):
    target = tmp_path / "precious.bin"
    target.write_bytes(b"the user's file")
    err = error_line(capsys, ["export", "--compact", str(finished), "--out", str(target)])
    assert err == f"--out '{target}' is a file; --compact writes a folder, choose another --out"
    assert target.read_bytes() == b"the user's file"


def test_the_compact_save_refuses_a_file_in_one_line(tmp_path):
    target = tmp_path / "precious.bin"
    target.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"is a file; a compacted model is saved as a folder, choose another path"):
        get_executor("compact").save(nn.Sequential(nn.Linear(3, 2)), target)
    assert target.read_bytes() == b"x"


@pytest.mark.parametrize("flag", ["--packed", "--onnx"])
def test_an_existing_out_file_is_never_replaced(finished, tmp_path, capsys, no_run_read, flag):
    target = tmp_path / "precious.bin"
    target.write_bytes(b"the user's file")
    err = error_line(capsys, ["export", flag, str(finished), "--out", str(target)])
    assert err == f"--out '{target}' exists; export does not overwrite: choose another name or remove it"
    assert target.read_bytes() == b"the user's file"


def test_a_folder_is_refused_where_a_file_goes_and_a_full_one_for_compact(finished, tmp_path, capsys, no_run_read):
    folder = tmp_path / "mine"
    folder.mkdir()
    err = error_line(capsys, ["export", "--packed", str(finished), "--out", str(folder)])
    assert err == f"--out '{folder}' is a folder; --packed writes a file, give a file name"
    (folder / "notes.txt").write_text("keep me")
    err = error_line(capsys, ["export", "--compact", str(finished), "--out", str(folder)])
    assert err == (
        f"--out '{folder}' is a folder with files in it; --compact writes a new folder: choose another --out or "
        "remove it"
    )
    assert [p.name for p in folder.iterdir()] == ["notes.txt"] and (folder / "notes.txt").read_text() == "keep me"


def test_an_empty_out_is_refused(finished, capsys, no_run_read):
    assert error_line(capsys, ["export", "--packed", str(finished), "--out", ""]) == "--out is empty; give a file name"
    assert error_line(capsys, ["export", "--compact", str(finished), "--out", ""]) == (
        "--out is empty; give a folder name"
    )


def test_new_outs_and_an_empty_compact_folder_are_written(finished, tmp_path, capsys):
    assert main(["export", "--packed", str(finished), "--out", str(tmp_path / "m.admmpk")]) == 0
    assert "outputs identical (eval mode)" in capsys.readouterr().out
    empty = tmp_path / "compacted"
    empty.mkdir()
    assert main(["export", "--compact", str(finished), "--out", str(empty)]) == 0
    assert (empty / "manifest.json").is_file()


# --- export --index-bits ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", ["99", "40", "33", "0", "-1"])
def test_index_bits_out_of_range_are_refused(finished, tmp_path, capsys, bits):
    out = tmp_path / "x.bin"
    argv = ["export", "--packed", str(finished), "--out", str(out), "--scheme", "relative", "--index-bits", bits]
    err = error_line(capsys, argv)
    assert err.startswith(f"index_bits={bits} must be in 1..32 (relative index bits b_r") and err.endswith(
        "), or best"
    )
    assert not out.exists()


def test_the_widest_index_bits_still_pack(finished, tmp_path, capsys):
    out = tmp_path / "x.bin"
    argv = ["export", "--packed", str(finished), "--out", str(out), "--scheme", "relative", "--index-bits", "32"]
    assert main(argv) == 0 and "outputs identical (eval mode)" in capsys.readouterr().out


# --- export verifies the run as report does ---------------------------------------------------------------


def test_a_run_without_metrics_json_is_not_exported(run, tmp_path, capsys):
    (run / "metrics.json").unlink()
    weights = load_file(str(run / "model.safetensors"))
    masks = load_file(str(run / "masks.safetensors"))
    first_pruned = tuple((~masks["fc1.weight"].bool()).nonzero()[0].tolist())
    weights["fc1.weight"][first_pruned] = 0.5  # a weight the masks prune, revived
    save_file(weights, str(run / "model.safetensors"))
    out = tmp_path / "m.admmpk"
    err = error_line(capsys, ["export", "--packed", str(run), "--out", str(out)])
    assert err == f"'{run}' has no metrics.json, so its outputs cannot be verified; give a finished run folder"
    assert not out.exists()
    assert "no metrics.json" in error_line(capsys, ["report", str(run)])  # report refuses it too
    with pytest.raises(FileNotFoundError, match="has no metrics.json, so its outputs cannot be verified"):
        run_export.open_run(run)


def test_a_missing_run_folder_says_it_does_not_exist(tmp_path, capsys):
    # it said "has no model.safetensors", as for a folder that is not a run's (a user review's finding)
    err = error_line(capsys, ["export", "--packed", str(tmp_path / "none"), "--out", str(tmp_path / "x")])
    assert f"'{tmp_path / 'none'}' does not exist; give the --out folder of a finished `admmcompress run`" in err
    err = error_line(capsys, ["export", "--packed", str(tmp_path), "--out", str(tmp_path / "x")])
    assert "has no model.safetensors" in err  # a folder that is not a run's


# --- a run's damaged files are named ----------------------------------------------------------------------


def test_an_unknown_key_in_the_runs_config_names_the_file(run, tmp_path, capsys):
    config = run / "config.yaml"
    spec = yaml.safe_load(config.read_text())
    spec["bogus_key"] = 1
    config.write_text(yaml.safe_dump(spec, sort_keys=False))
    err = error_line(capsys, ["export", "--packed", str(run), "--out", str(tmp_path / "m.admmpk")])
    assert err.startswith(f"'{config}' holds other values than the run was made with")  # its checksum first
    metrics_file = run / "metrics.json"  # a run recorded before config checksums: the config's own message
    data = json.loads(metrics_file.read_text())
    del data["metrics"]["integrity"]["config"]
    seal(data["metrics"], data["history"])
    metrics_file.write_text(json.dumps(data))
    err = error_line(capsys, ["export", "--packed", str(run), "--out", str(tmp_path / "m.admmpk")])
    assert err.startswith(f"'{config}': unknown key(s) ['bogus_key']; allowed: ")
    with pytest.raises(ValueError, match=r"config\.yaml': unknown key\(s\) \['bogus_key'\]"):
        run_export.read_run_config(run)  # what `report` is to call too (cli._report)


def test_compare_says_a_metrics_json_that_is_not_json_is_damaged(finished, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.json").write_text("{bad json")
    err = error_line(capsys, ["report", "--compare", str(finished), str(bad)])
    assert err.startswith(f"'{bad / 'metrics.json'}' is not valid JSON (") and err.endswith("): the file is damaged")
    assert not (tmp_path / "compare.png").exists()


# --- report --compare never overwrites --------------------------------------------------------------------


def test_compare_without_out_never_replaces_a_plot_and_repeats(finished, tmp_path, capsys, monkeypatch):
    """The default plot goes to the first free name: compare.png, compare-2.png, ..."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "compare.png").write_bytes(b"the user's plot")
    for name in ("compare-2.png", "compare-3.png"):
        assert main(["report", "--compare", str(finished)]) == 0
        assert f"(plot in {name})" in capsys.readouterr().out and (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "compare.png").read_bytes() == b"the user's plot"


@pytest.mark.parametrize("existing", ["notes.md", "notes.png"])
def test_compare_refuses_an_existing_table_or_plot(finished, tmp_path, capsys, existing):
    (tmp_path / existing).write_text("the user's notes")
    out = tmp_path / "notes.md"
    err = error_line(capsys, ["report", "--compare", str(finished), "--out", str(out)])
    assert err == f"'{tmp_path / existing}' exists; give --out NEW.md or remove it"
    assert sorted(p.name for p in tmp_path.iterdir()) == [existing]
    assert (tmp_path / existing).read_text() == "the user's notes"


def test_compare_writes_new_files_atomically(finished, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = compare_runs([finished], tmp_path / "t" / "notes.md")
    assert "(table in" in text and (tmp_path / "t" / "notes.md").is_file() and (tmp_path / "t" / "notes.png").is_file()
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["notes.md", "notes.png"]  # no temp files left
    with pytest.raises(ValueError, match="notes.md' exists; give --out NEW.md or remove it"):
        compare_runs([finished], tmp_path / "t" / "notes.md")
    assert json.loads((finished / "metrics.json").read_text())["metrics"]  # the run is untouched


# --- report --compare verifies each run; report --rehash names a wrong value's key ------------------------------


def test_compare_refuses_a_run_that_report_refuses(finished, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tampered = tmp_path / "tampered"
    shutil.copytree(finished, tampered)
    path = tampered / "metrics.json"
    data = json.loads(path.read_text())
    data["metrics"]["accuracy_after"] = 99.99
    path.write_text(json.dumps(data))
    err = error_line(capsys, ["report", "--compare", str(tampered), str(finished)])
    assert err.startswith(f"'{path}' does not match the checksum recorded in it")
    assert not (tmp_path / "compare.png").exists()


def test_compare_notes_a_run_written_before_checksums(run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = run / "metrics.json"
    data = json.loads(path.read_text())
    del data["metrics"]["integrity"]
    path.write_text(json.dumps(data))
    assert main(["report", "--compare", str(run)]) == 0
    assert "admmcompress: note: " in capsys.readouterr().err


def test_rehash_with_compare_is_refused(finished, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = error_line(capsys, ["report", "--rehash", "--compare", str(finished)])
    assert "--rehash" in err and "--compare" in err and not (tmp_path / "compare.png").exists()


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        (("stats", "layers"), "x", "metrics.stats.layers holds 'x' (a str); it must hold a list"),
        (("test_accuracy",), "high", "metrics.test_accuracy holds 'high' (a str); it must hold a number"),
        (("accuracy_after",), [1], "metrics.accuracy_after holds [1] (a list); it must hold a number"),
        (("stats", "layers", 0, "name"), 3, "metrics.stats.layers[0] holds"),
        (("phase_seconds",), {"retrain": "slow"}, "metrics.phase_seconds.retrain holds 'slow' (a str)"),
    ],
)
def test_rehash_names_the_key_of_a_value_of_the_wrong_type(run, capsys, key, value, named):
    path = run / "metrics.json"
    data = json.loads(path.read_text())
    entry = data["metrics"]
    for k in key[:-1]:
        entry = entry[k]
    entry[key[-1]] = value
    path.write_text(json.dumps(data))
    before = path.read_bytes()
    err = error_line(capsys, ["report", str(run), "--rehash"])
    assert err.startswith(f"'{path}': {named}")
    assert path.read_bytes() == before and "Traceback" not in err


def test_a_metrics_json_without_stats_names_the_missing_key(run, capsys):
    path = run / "metrics.json"
    data = json.loads(path.read_text())
    del data["metrics"]["stats"]
    path.write_text(json.dumps(data))
    err = error_line(capsys, ["report", str(run), "--rehash"])
    assert err.startswith(f"'{path}' has no 'stats' entry under 'metrics'")


def test_report_measures_a_recurrent_layer_again_from_its_per_matrix_rows(tmp_path):
    from admmcompress.cli import _measured_layers
    from admmcompress.models import create_model
    from admmcompress.report.metrics import measure

    model = create_model("gru_fsdd", hidden=32)
    rows = measure(model, ["gru"]).to_dict()["layers"]  # one row per matrix: 'gru.weight_ih_l0', ...
    assert _measured_layers(model, rows, tmp_path / "metrics.json") == ["gru"]
    with pytest.raises(ValueError, match=r"metrics\.json': metrics\.stats\.layers names \['conv9'\], which the model"):
        _measured_layers(model, [*rows, {"name": "conv9"}], tmp_path / "metrics.json")


def test_compare_waits_for_a_run_that_is_still_writing(run, finished, capsys):
    """A live run's folder (its lock held) is refused by --compare with one line, not read as a damaged run."""
    from admmcompress.train.lock import RunLock

    table = str(run.parent / "table.md")
    with RunLock(run):
        message = error_line(capsys, ["report", "--compare", str(run), str(finished), "--out", table])
    assert "--compare reads its final outputs, so compare it once it has ended" in message
    assert main(["report", "--compare", str(run), str(finished), "--out", table]) == 0  # released: compared


def test_the_command_says_its_version(capsys):
    import torch

    from admmcompress import __version__

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"admmcompress {__version__} (torch {torch.__version__})"
