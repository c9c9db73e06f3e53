"""Wrong inputs to ``compress`` and ``CompressionResult.save`` are one clear line, before anything trains or
is written, and nothing the user had is replaced without ``overwrite=True``."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from admmcompress import Plan, PlanError, Unstructured, compress
from admmcompress.api import SAVED_FILES, CompressionResult, OutputFolderError
from admmcompress.data.datasets import Split

pytestmark = pytest.mark.filterwarnings("ignore:ADMM residual:RuntimeWarning")

PLAN = Plan({"1": Unstructured(sparsity=0.5)})
SHORT = {"method": "magnitude", "admm": {"epochs": 1}, "retrain": {"epochs": 1}, "batch_size": 8}


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 4))


def data(n: int = 16, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randn(n, 12, generator=g), torch.randint(0, 4, (n,), generator=g))


@pytest.fixture(scope="module")
def result() -> CompressionResult:
    return compress(tiny_model(), PLAN, data(), data(8, 1), **SHORT)


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


# --- CompressionResult.save -------------------------------------------------------------------------
def test_save_refuses_to_replace_the_users_report_and_keeps_it(result, tmp_path):
    mine = tmp_path / "report.md"
    mine.write_text("my own notes")
    with pytest.raises(OutputFolderError) as err:  # the old code replaced report.md silently
        result.save(tmp_path)
    assert one_line(err) == (
        f"save: '{tmp_path}' already holds report.md; save does not overwrite: choose another out_dir, remove them, "
        "or pass overwrite=True"
    )
    assert mine.read_text() == "my own notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]  # nothing else written either


def test_save_with_overwrite_replaces_its_own_files(result, tmp_path):
    (tmp_path / "report.md").write_text("old report")
    (tmp_path / "notes.txt").write_text("kept")
    text = result.save(tmp_path, overwrite=True)
    assert (tmp_path / "report.md").read_text() == text
    assert (tmp_path / "notes.txt").read_text() == "kept"
    with pytest.raises(OutputFolderError, match="already holds metrics.json, report.md, sparsity.png"):
        result.save(tmp_path)  # a second save into the same folder needs overwrite=True too


def test_save_into_a_new_folder_or_next_to_other_files_works(result, tmp_path):
    result.save(tmp_path / "new" / "report")
    assert all((tmp_path / "new" / "report" / name).is_file() for name in ("report.md", "metrics.json"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"state")  # compress(out_dir=...) then save there
    result.save(tmp_path / "run")
    assert (tmp_path / "run" / "report.md").is_file() and (tmp_path / "run" / "checkpoint.pt").read_bytes() == b"state"


def test_save_into_a_file_or_over_a_folder_is_refused(result, tmp_path):
    a_file = tmp_path / "out"
    a_file.write_text("mine")
    with pytest.raises(OutputFolderError) as err:
        result.save(a_file)
    assert one_line(err) == f"save: out_dir '{a_file}' is a file; choose a folder for the outputs"
    (tmp_path / "dir" / "report.md").mkdir(parents=True)
    with pytest.raises(OutputFolderError, match="is a folder where save writes a file"):
        result.save(tmp_path / "dir", overwrite=True)
    assert a_file.read_text() == "mine"


def test_saved_files_are_the_ones_save_writes(result, tmp_path):
    result.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} <= set(SAVED_FILES)


# --- compress -------------------------------------------------------------------------------------
def test_compress_with_an_empty_plan_list_is_refused():
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PlanError) as err:  # the old code returned the model untouched, silently
        compress(model, [], data(), data(8, 1), **SHORT)
    assert one_line(err) == (
        "compress: the plan list is empty; give a Plan, or a list of Plans (one per pruning step)"
    )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("below", ["", "sub"])
def test_compress_into_a_file_is_refused_before_training(tmp_path, below):
    a_file = tmp_path / "out"
    a_file.write_text("mine")
    out = a_file / below if below else a_file
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(OutputFolderError) as err:  # the old code trained an epoch, then failed naming --resume
        compress(model, PLAN, data(), data(8, 1), out_dir=out, **SHORT)
    text = one_line(err)
    assert text.startswith(f"compress: out_dir '{out}' ") and "choose a folder for the outputs" in text
    assert "--resume" not in text
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert a_file.read_text() == "mine"


def test_compress_into_a_folder_it_cannot_write_is_refused_before_training(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("admmcompress.api.tempfile.TemporaryFile", refuse)  # root ignores chmod: simulate it
    with pytest.raises(OutputFolderError) as err:
        compress(tiny_model(), PLAN, data(), data(8, 1), out_dir=tmp_path / "new", **SHORT)
    assert one_line(err) == (
        f"compress: cannot write into out_dir '{tmp_path / 'new'}' (Permission denied); choose a folder you can "
        "write to"
    )
    assert not (tmp_path / "new").exists()  # the check creates nothing


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs a non-root POSIX user")
def test_compress_into_a_read_only_folder_is_refused(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(OutputFolderError, match="cannot write into out_dir"):
            compress(tiny_model(), PLAN, data(), data(8, 1), out_dir=folder, **SHORT)
    finally:
        folder.chmod(0o700)


def test_compress_with_a_usable_out_dir_still_checkpoints(tmp_path):
    out: Path = tmp_path / "a" / "b"
    compress(tiny_model(), PLAN, data(), data(8, 1), out_dir=out, **SHORT)
    assert (out / "checkpoint.pt").is_file()


def test_compress_does_not_replace_an_earlier_runs_checkpoint_unless_told(tmp_path):
    out: Path = tmp_path / "run"
    compress(tiny_model(), PLAN, data(), data(8, 1), out_dir=out, **SHORT)
    first = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(OutputFolderError) as err:  # the old code trained and wrote over it
        compress(tiny_model(), PLAN, data(), data(8, 1), out_dir=out, **SHORT)
    assert one_line(err) == (
        f"compress: out_dir '{out}' already holds checkpoint.pt of an earlier run; pass resume=True to continue it, "
        "overwrite=True to replace it, or choose another out_dir"
    )
    assert (out / "checkpoint.pt").read_bytes() == first
    compress(tiny_model(), PLAN, data(), data(8, 1), out_dir=out, overwrite=True, **SHORT)
    assert (out / "checkpoint.pt").is_file()


@pytest.mark.parametrize(
    ("train", "expected"),
    [
        ("loader", "train is a DataLoader; pass its dataset (train_loader.dataset): batches are drawn by the run's "
                   "own batch size and seed (compress(batch_size=...) or data.batch_size)"),
        ("tuple", "train is a tuple, not a dataset: wrap the tensors, e.g. torch.utils.data.TensorDataset(x, y)"),
        ("array", "train is a dict, not a dataset: give a torch Dataset (e.g. TensorDataset(x, y)) or "
                  "admmcompress.data.load_dataset(name, split)"),
    ],
)
def test_compress_names_data_that_is_no_dataset_in_one_line(train, expected):
    from torch.utils.data import DataLoader, TensorDataset

    from admmcompress import Plan, Unstructured, compress

    x, y = torch.randn(32, 12), torch.randint(0, 3, (32,))
    data = {"loader": DataLoader(TensorDataset(x, y), batch_size=8), "tuple": (x, y), "array": {"x": x}}[train]
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    with pytest.raises(TypeError) as err:
        compress(model, Plan({"0": Unstructured(sparsity=0.5)}), data, TensorDataset(x, y), admm={"epochs": 1})
    assert str(err.value) == expected


def test_compress_takes_a_list_of_rules_as_one_plan():
    from torch.utils.data import TensorDataset

    from admmcompress import Rule, Unstructured, compress

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(32, 12), torch.randint(0, 3, (32,)))
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    result = compress(model, [Rule(Unstructured(sparsity=0.5), match="0"), Rule(Unstructured(sparsity=0.25),
                      match="2")], data, data, admm={"epochs": 1}, retrain={"epochs": 1}, progress=False)
    assert len(result.metrics["stages"]) == 1
    assert int((model[0].weight == 0).sum()) == 96 and int((model[2].weight == 0).sum()) == 12


def test_a_float64_model_on_float32_data_names_the_dtypes():
    from torch.utils.data import TensorDataset

    from admmcompress import Plan, Unstructured, compress

    data = TensorDataset(torch.randn(16, 12), torch.randint(0, 3, (16,)))
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).double()
    with pytest.raises(ValueError) as err:
        compress(model, Plan({"0": Unstructured(sparsity=0.5)}), data, data, admm={"epochs": 1})
    assert str(err.value).endswith("the model's weights are float64 and the inputs float32: convert one, e.g. "
                                   "model.float()")


def _full_disk(path, state):
    from admmcompress.atomic import WriteError

    raise WriteError(28, f"cannot write '{path}': No space left on device")


def test_a_failed_checkpoint_write_gives_advice_for_where_the_run_came_from(tmp_path, monkeypatch, capsys,
                                                                            tiny_finished_run):
    """compress() without a checkpoint yet: call again; the CLI's advice is --resume --out (review finding)."""
    from torch.utils.data import TensorDataset

    from admmcompress import Plan, Unstructured, compress
    from admmcompress.atomic import WriteError
    from admmcompress.cli import main
    from admmcompress.train import runner

    monkeypatch.setattr(runner.ckpt, "save_state", _full_disk)
    data = TensorDataset(torch.randn(16, 12), torch.randint(0, 3, (16,)))
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    with pytest.raises(WriteError) as err:
        compress(model, Plan({"0": Unstructured(sparsity=0.5)}), data, data, admm={"epochs": 1},
                 out_dir=tmp_path / "api", progress=False)
    assert str(err.value).endswith("then call compress again (no checkpoint was saved yet)")
    config = tiny_finished_run / "config.yaml"  # the tiny run's own config, run again into a new folder
    assert main(["run", str(config), "--out", str(tmp_path / "cli"), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().endswith(f"then continue the run with --resume --out {tmp_path / 'cli'}")
