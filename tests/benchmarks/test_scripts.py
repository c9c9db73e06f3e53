"""Every benchmark script imports and answers --help; the LSTM and CNN helpers run on the library's loop."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from admmcompress.data.datasets import Split

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py") if "__main__" in p.read_text())


@pytest.fixture()
def bench(load_benchmark):
    return load_benchmark


def test_the_scripts_are_found():
    assert {"lstm_ptb", "structured_cifar", "gru_fsdd", "block_lenet5"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_imports_and_prints_help(bench, name, monkeypatch, capsys):
    module = bench(name)
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        module.main()
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_help_from_the_command_line():
    done = subprocess.run([sys.executable, str(BENCHMARKS / "lstm_ptb.py"), "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "usage: lstm_ptb.py" in done.stdout


def test_no_private_training_loop_is_left():
    """Training goes through admmcompress.train.loop.train_epoch (or the Runner): no backward() in benchmarks/."""
    skip = {
        "training_speed.py",  # times single SGD steps under several settings; trains nothing
        "ddp_cifar.py",  # times single DDP steps (with and without the ADMM state); its epoch uses train_epoch
        "structured_common.py",  # accumulate_gradients: a few batches for Taylor importance; no optimizer step
    }
    offenders = [p.name for p in BENCHMARKS.glob("*.py") if ".backward(" in p.read_text() and p.name not in skip]
    assert offenders == []


@pytest.mark.filterwarnings("ignore:ADMM residual")
@pytest.mark.parametrize("method", ["admm", "reweighted", "magnitude", "dense"])
def test_lstm_methods_run_on_the_library_loop(bench, method):
    lstm = bench("lstm_ptb")
    torch.manual_seed(0)
    model = lstm.LSTMLanguageModel(60, embed=8, hidden=8, num_layers=2, dropout=0.1, cutoffs=[20, 40])
    data = torch.randint(0, 60, (200, 4))
    args = argparse.Namespace(prune_epochs=1.0, retrain_epochs=0.5, epoch_steps=8, lr=1e-2, lam=1e-3, rho=1e-2)
    pruned, midway = lstm.compress(method, 4, model, data, data[:60], args)
    assert midway == midway and midway > 1  # a finite perplexity
    lstm_weights = [p for n, p in pruned.named_parameters() if n.startswith("lstm.weight")]
    kept = sum(int((w != 0).sum()) for w in lstm_weights) / sum(w.numel() for w in lstm_weights)
    assert kept == pytest.approx(1.0 if method == "dense" else 0.25, abs=0.02)


def test_lstm_windows_cycle_and_restart_the_state(bench):
    lstm = bench("lstm_ptb")
    carrier = lstm.CarriedState(lstm.LSTMLanguageModel(30, embed=4, hidden=4, num_layers=1, dropout=0.0))
    data = torch.arange(2 * 71).view(71, 2) % 30  # 70 usable steps: two 35-step windows per pass
    windows = lstm.Windows(data, 5, carrier)
    carrier.state = (torch.zeros(1), torch.zeros(1))
    got = list(windows)
    assert carrier.state is None and len(got) == len(windows) == 5
    assert torch.equal(got[0][0], got[2][0]) and torch.equal(got[1][1], got[3][1])  # cycles through the data


def test_fit_uses_the_library_augmentation_and_keeps_masks(bench):
    common = bench("structured_common")
    from admmcompress.finalize import MaskSet
    from admmcompress.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet20")
    mask = (torch.rand_like(model.conv1.weight) > 0.5).float()
    with torch.no_grad():
        model.conv1.weight.mul_(mask)
    data = Split(torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,)))
    lines = []
    common.fit(model, data, 2, 0.05, optimizer="sgd", batch_size=8, weight_decay=5e-4,
               masks=MaskSet({"conv1.weight": mask.bool()}), augment=common.CIFAR_AUGMENT, log=lines.append)
    assert len(lines) == 2 and lines[0].startswith("  epoch 1/2: loss ")
    assert torch.all(model.conv1.weight[mask == 0] == 0) and not model.training
    assert common.CIFAR_AUGMENT.shift == 4 and common.CIFAR_AUGMENT.hflip
