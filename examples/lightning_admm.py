"""ADMM pruning inside PyTorch Lightning: one callback (``pip install 'admmcompress[lightning]'``).

    python examples/lightning_admm.py [--limit 6000] [--admm-epochs 2] [--finetune-epochs 1] [--devices 1]
    python examples/lightning_admm.py --devices 2      # the DDP strategy, 2 CPU processes (gloo)

The LightningModule is ordinary (no ADMM code in it); ``ADMMCallback`` adds the penalty to every training
step, runs the Z/U updates each epoch, hard-prunes after ``--admm-epochs`` and keeps the masks for the
fine-tuning epochs. Penalty, rho and the per-layer residual go to the trainer's logger (CSV here, in
``--log-dir``; TensorBoardLogger works the same way).
"""

from __future__ import annotations

import argparse
import tempfile

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from admmcompress import Plan, Unstructured, measure
from admmcompress.data import load_dataset
from admmcompress.models import LeNet300100
from admmcompress.train.lightning import ADMMCallback, masked_weights_zero
from admmcompress.train.loop import evaluate


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = LeNet300100()

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), 1e-3)


def main(limit: int = 6000, admm_epochs: int = 2, finetune_epochs: int = 1, devices: int = 1,
         log_dir: str | None = None) -> dict[str, float]:
    pl.seed_everything(0, verbose=False)
    train, test = load_dataset("mnist", "train", limit=limit), load_dataset("mnist", "test", limit=2000)
    loader = DataLoader(TensorDataset(train.x, train.y), batch_size=64, shuffle=True)
    module = Classifier()
    dense = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                       enable_progress_bar=False, enable_model_summary=False)
    dense.fit(module, loader)  # an ordinary dense model first
    dense_accuracy = evaluate(module.net, test)

    plan = Plan({"fc1": Unstructured(compression=20), "fc2": Unstructured(compression=10),
                 "fc3": Unstructured(compression=4)})
    callback = ADMMCallback(plan, admm_epochs=admm_epochs, options={"rho": 1e-3}, submodule="net")
    logger = pl.loggers.CSVLogger(log_dir or tempfile.mkdtemp(prefix="lightning_admm_"), name="admm")
    trainer = pl.Trainer(max_epochs=admm_epochs + finetune_epochs, accelerator="cpu", devices=devices,
                         strategy="ddp_spawn" if devices > 1 else "auto", callbacks=[callback], logger=logger,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)
    # With devices > 1 (ddp_spawn) the ranks trained in child processes; Lightning copies rank 0's weights back.
    stats = measure(module.net, ["fc1", "fc2", "fc3"])
    result = {"dense_accuracy": dense_accuracy, "pruned_accuracy": evaluate(module.net, test),
              "compression": stats.overall_compression,
              "masks_hold": callback.masks is not None and masked_weights_zero(module.net, callback.masks),
              "log": str(logger.log_dir)}
    print(f"dense {dense_accuracy:.2f}% -> pruned {result['pruned_accuracy']:.2f}% at "
          f"{stats.overall_compression:.1f}x (logs in {result['log']})")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, default=6000)
    parser.add_argument("--admm-epochs", type=int, default=2)
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--log-dir")
    args = parser.parse_args()
    main(args.limit, args.admm_epochs, args.finetune_epochs, args.devices, args.log_dir)
