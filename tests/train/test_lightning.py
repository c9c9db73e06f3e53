"""The Lightning callback: penalty in the training step, Z/U updates, hard prune, masked fine-tune (one process)."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")

from admmcompress.plan import Plan  # noqa: E402
from admmcompress.structures import Unstructured  # noqa: E402
from admmcompress.train.lightning import ADMMCallback  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lightning_admm.py"
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore:ADMM residual:RuntimeWarning")


def _example():
    spec = importlib.util.spec_from_file_location("lightning_admm", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lightning_example_prunes_to_the_plan_and_logs_the_admm_state(tmp_path):
    result = _example().main(limit=512, admm_epochs=2, finetune_epochs=1, log_dir=str(tmp_path))
    # fc1 20x, fc2 10x, fc3 4x: 11,760 + 3,000 + 250 = 15,010 of 266,200 weights kept, held through fine-tuning
    assert result["compression"] == pytest.approx(266200 / 15010, abs=1e-9)
    assert result["masks_hold"]
    rows = list(csv.DictReader(open(Path(result["log"]) / "metrics.csv")))
    epochs = [r for r in rows if r.get("admm/rho")]
    assert [float(r["admm/rho"]) for r in epochs] == pytest.approx([1.3e-3, 1.69e-3])  # rho x1.3 per update
    assert all(0 <= float(r["admm/residual/fc1.weight:unstructured"]) for r in epochs)


def test_callback_refuses_bad_settings_in_one_line():
    plan = Plan({"fc1": Unstructured(compression=2)})
    with pytest.raises(ValueError, match="admm_epochs=0 must be an integer >= 1"):
        ADMMCallback(plan, admm_epochs=0)
    with pytest.raises(ValueError, match="not both"):
        ADMMCallback(plan, admm_epochs=1, update_every_epochs=1, update_every_steps=5)
    with pytest.raises(ValueError, match="method='nope'; choose one of"):
        ADMMCallback(plan, admm_epochs=1, method="nope")
    with pytest.raises(ValueError, match=r"coupling='strict' traces the network: give example=\.\.\."):
        ADMMCallback(plan, admm_epochs=1, coupling="strict")
    with pytest.raises(ValueError, match="coupling='strict' needs a method that drives coupled targets"):
        ADMMCallback(plan, admm_epochs=1, method="reweighted", coupling="strict", example=torch.zeros(1, 784))


def test_a_coupled_plan_prunes_whole_channel_groups(tmp_path):
    """coupling='strict' with an example: the plan is resolved over channel groups, so the fine-tuned network
    compacts (per layer, tied layers could prune different channels)."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from admmcompress.data import load_dataset
    from admmcompress.executors.compact import compact
    from admmcompress.structures import Filter

    example = _example()
    pl.seed_everything(0, verbose=False)
    train = load_dataset("mnist", "train", limit=128)
    module = example.Classifier()
    x = train.x[:2]
    callback = ADMMCallback(Plan({"fc1": Filter(sparsity=0.5)}), admm_epochs=1, options={"rho": 1e-2},
                            submodule="net", coupling="strict", example=x)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, callbacks=[callback], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(module, DataLoader(TensorDataset(train.x, train.y), batch_size=64))
    assert "fc2.weight" in callback.masks  # the coupled target also zeroes the columns that read fc1's rows
    result = compact(module.net.eval(), x, callback.masks)
    assert result.params_after < result.params_before and result.max_abs_diff <= 1e-4


def _fit(tmp_path, max_epochs: int, ckpt_path: str | None = None):
    """LeNet-300-100 on 256 MNIST images in a fixed order; ADMM 2 epochs, then masked fine-tuning."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from admmcompress.data import load_dataset

    example = _example()
    pl.seed_everything(0, verbose=False)
    train = load_dataset("mnist", "train", limit=256)
    loader = DataLoader(TensorDataset(train.x, train.y), batch_size=64, shuffle=False)  # resumable order
    module = example.Classifier()
    plan = Plan({"fc1": Unstructured(compression=8), "fc2": Unstructured(compression=4)})
    callback = ADMMCallback(plan, admm_epochs=2, options={"rho": 1e-2}, submodule="net")
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_epochs=1, save_top_k=-1)
    trainer = pl.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, callbacks=[callback, saver],
                         logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return module, callback


@pytest.mark.parametrize("stop_after", [1, 2], ids=["during-admm", "after-hard-prune"])
def test_a_resumed_lightning_run_ends_where_the_uninterrupted_one_does(tmp_path, stop_after):
    """Stopped after epoch 1 (the driver's Z, U and rho in the checkpoint) or 2 (the masks), then resumed."""
    import torch

    whole, whole_cb = _fit(tmp_path / "whole", 4)
    _fit(tmp_path / "cut", stop_after)
    (last,) = (tmp_path / "cut").glob("last*.ckpt")
    resumed, resumed_cb = _fit(tmp_path / "cut", 4, ckpt_path=str(last))
    assert resumed_cb.masks is not None and whole_cb.masks is not None
    for name, mask in whole_cb.masks.items():
        assert torch.equal(resumed_cb.masks[name], mask)
    for (name, a), (_, b) in zip(whole.net.state_dict().items(), resumed.net.state_dict().items(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0, msg=f"{name} differs after the resume")
