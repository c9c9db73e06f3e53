"""--resume from a checkpoint or config.yaml that is damaged or foreign: one line naming the file, the key and
the fix (never a bare key name, a traceback, or a traceback after training)."""

from __future__ import annotations

import pytest
import torch
import yaml

from admmcompress.cli import main
from admmcompress.data.datasets import Split
from admmcompress.models import LeNet300100
from admmcompress.train import checkpoint as ckpt
from admmcompress.train import training_state
from admmcompress.train.config import RunConfig
from admmcompress.train.runner import STATE_FILE, Runner, read_progress

pytestmark = pytest.mark.filterwarnings("ignore:ADMM residual:RuntimeWarning")
# Every key a resume reads without a default (Runner._save writes them all).
REQUIRED = ["phase_index", "epoch", "model", "optimizer", "driver", "masks", "loader", "rng", "history", "metrics"]

SPEC = {
    "name": "resume_inputs",
    "seed": 0,
    "model": {"name": "lenet300100"},
    "data": {"dataset": "mnist", "batch_size": 16, "train_limit": 32, "test_limit": 16},
    "pretrain": {"epochs": 1},
    "stages": [
        {
            "plan": {"rules": [{"match": "fc1", "structure": "unstructured", "sparsity": 0.5}]},
            "admm": {"epochs": 1, "update_every_steps": 1},
            "retrain": {"epochs": 1},
        }
    ],
}


def good_state() -> dict:
    """A training state as Runner._save writes one (before any phase finished)."""
    return {
        "phase_index": 0,
        "epoch": 1,
        "model": LeNet300100().state_dict(),
        "optimizer": None,
        "driver": None,
        "average": None,
        "masks": {},
        "loader": {"generator": torch.Generator().get_state()},
        "rng": torch.get_rng_state(),
        "threads": 1,
        "history": [{"phase": "pretrain", "epoch": 1, "loss": 0.5, "accuracy": 50.0}],
        "metrics": {"stages": [{}], "phase_seconds": {}},
        "transforms": [],
    }


def error_line(capsys, argv: list[str]) -> str:
    """The CLI's one `admmcompress: error:` line (exit 2, no traceback)."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("admmcompress: error: ")]
    assert len(errors) == 1, err
    return errors[0].removeprefix("admmcompress: error: ")


def test_a_good_state_passes_and_read_progress_reads_it(tmp_path):
    ckpt.save_state(tmp_path / STATE_FILE, good_state())
    assert read_progress(tmp_path) == (0, 1)
    state = good_state()
    del state["threads"], state["transforms"], state["average"]  # older checkpoints lack these
    training_state.check_training_state(state, tmp_path / STATE_FILE)
    assert list(training_state.STATE_KEYS) == REQUIRED


@pytest.mark.parametrize("key", REQUIRED)
def test_a_state_without_a_key_is_not_a_training_state(tmp_path, key):
    state = good_state()
    del state[key]
    path = ckpt.save_state(tmp_path / STATE_FILE, state)
    with pytest.raises(ckpt.CheckpointError) as err:
        read_progress(tmp_path)
    message = str(err.value)
    assert message.startswith(f"checkpoint '{path}' is not a training state of this tool (no '{key}')")
    assert "--overwrite" in message and "\n" not in message


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("epoch", "3", "'epoch' is str, expected int"),
        ("phase_index", 1.5, "'phase_index' is float, expected int"),
        ("phase_index", True, "'phase_index' is bool, expected int"),
        ("epoch", -1, "'epoch' is -1, expected a count >= 0"),
        ("metrics", "abc", "'metrics' is str, expected dict"),
        ("history", "abc", "'history' is str, expected list"),
        ("history", ["abc"], "'history' holds a str, expected dict items"),
        ("driver", "abc", "'driver' is str, expected dict or None"),
        ("optimizer", "abc", "'optimizer' is str, expected dict or None"),
        ("loader", "abc", "'loader' is str, expected dict"),
        ("masks", "abc", "'masks' is str, expected dict"),
        ("masks", {"fc1.weight": "abc"}, "'masks' holds a str, expected Tensor items"),
        ("rng", "abc", "'rng' is str, expected Tensor"),
        ("rng", torch.zeros(3), "'rng' is a torch.float32 tensor"),
        ("transforms", "abc", "'transforms' is str, expected list"),
        ("teacher", "abc", "'teacher' is str, expected dict or None"),
        ("metrics", {"stages": "x", "phase_seconds": {}}, "'metrics' has no 'stages' list"),
    ],
)
def test_a_value_of_the_wrong_type_names_the_key(tmp_path, key, value, expected):
    state = good_state()
    state[key] = value
    path = ckpt.save_state(tmp_path / STATE_FILE, state)
    with pytest.raises(ckpt.CheckpointError) as err:
        read_progress(tmp_path)
    message = str(err.value)
    assert message.startswith(f"checkpoint '{path}': {expected}")
    assert "--overwrite" in message and "\n" not in message


def test_resume_from_a_plain_state_dict_is_one_line(tmp_path, capsys):
    """The reviewer's case: torch.save(model.state_dict()) over an unfinished run's checkpoint."""
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(SPEC, sort_keys=False))
    out = tmp_path / "run"
    out.mkdir()
    torch.save(LeNet300100().state_dict(), out / STATE_FILE)
    for extra in ([], ["--dry-run"]):
        message = error_line(capsys, ["run", str(config), "--out", str(out), "--resume", *extra])
        assert message.startswith(f"checkpoint '{out / STATE_FILE}' is not a training state of this tool "
                                  "(no 'phase_index')"), message


def _runner(out, from_cli: bool = True) -> Runner:
    torch.manual_seed(0)
    x, y = torch.randn(32, 1, 28, 28), torch.arange(32) % 10
    config = RunConfig.from_dict(SPEC)
    runner = Runner(config, LeNet300100(), Split(x, y), Split(x[:16], y[:16]), out_dir=out, progress=False)
    runner.from_cli = from_cli  # as the CLI builds it, unless a test asks for compress()'s
    return runner


@pytest.mark.parametrize(
    "key, value",
    [
        ("loader", {"generator": "abc"}),
        ("loader", {}),
        ("masks", {"fc1.weight": torch.ones(2)}),
        ("transforms", [{"method": "admm"}]),
        ("optimizer", {"state": {}, "param_groups": "abc"}),
    ],
)
def test_content_that_does_not_fit_names_the_checkpoint_and_key(tmp_path, key, value):
    """Right in type, wrong inside: restoring it is one line naming the file and key, not a traceback."""
    _runner(tmp_path).run()
    path = tmp_path / STATE_FILE
    state = ckpt.load_state(path)
    state.update(phase_index=0, epoch=0)  # the pretrain phase again: its optimizer state is loaded on entry
    state[key] = value
    ckpt.save_state(path, state)
    with pytest.raises(ckpt.CheckpointError) as err:
        _runner(tmp_path).run(resume=True)
    message = str(err.value)
    assert message.startswith(f"checkpoint '{path}': its '{key}' cannot be restored (")
    assert message.endswith("; it is damaged or not a training state of this tool: a run cannot resume from it: "
                            "start the run again (--overwrite) or in another --out")
    assert "\n" not in message
    with pytest.raises(ckpt.CheckpointError) as err:  # a Runner not built by the CLI advises compress's arguments
        _runner(tmp_path, from_cli=False).run(resume=True)
    assert str(err.value) == message.replace(ckpt.RESTART_CLI, ckpt.RESTART_API)


def test_resume_with_a_binary_config_yaml_names_the_file(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(SPEC, sort_keys=False))
    out = tmp_path / "run"
    out.mkdir()
    ckpt.save_state(out / STATE_FILE, good_state())
    (out / "config.yaml").write_bytes(b"model: \x96\xff\x00 binary")
    message = error_line(capsys, ["run", str(config), "--out", str(out), "--resume", "--dry-run"])
    assert f"'{out / 'config.yaml'}' is not text" in message and "--overwrite" in message
    assert "codec" not in message
