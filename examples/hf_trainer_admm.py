"""ADMM inside the Hugging Face Trainer: one callback (``pip install 'admmcompress[hf]'``).

    python examples/hf_trainer_admm.py [--limit 10000] [--admm-epochs 2] [--finetune-epochs 1]

A small ViT (``transformers.ViTForImageClassification`` built from a config: nothing is downloaded) is trained
on Fashion-MNIST for ``--dense-epochs``, then its FFN layers are pruned to 2:4 semi-structured sparsity with
``ADMMTrainerCallback``: the Trainer is ordinary, the callback adds the ADMM penalty's gradient at every
optimizer step, runs the Z/U updates, hard-prunes after ``--admm-epochs`` and keeps the masks for the
fine-tuning epochs. Prints dense and pruned test accuracy and checks the 2:4 pattern. (On CPU a 2:4 model runs
as a masked dense model; sparse tensor cores are a CUDA feature.)
"""

from __future__ import annotations

import argparse
import tempfile
import warnings

import torch
import transformers

from admmcompress.data import load_dataset
from admmcompress.plan import Plan, Rule
from admmcompress.structures import NM
from admmcompress.train.hf_trainer import ADMMTrainerCallback


class Images(torch.utils.data.Dataset):
    """(N, 1, 28, 28) float images and labels as the dicts the Trainer feeds ViT."""

    def __init__(self, split) -> None:
        self.x, self.y = split.x, split.y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def accuracy(model: torch.nn.Module, split) -> float:
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(pixel_values=x).logits for x in split.x.split(500)])
    return 100.0 * float((logits.argmax(1) == split.y).float().mean())


def fit(model, train, epochs: int, folder: str, callbacks=()) -> None:
    args = transformers.TrainingArguments(
        folder, num_train_epochs=epochs, per_device_train_batch_size=64, learning_rate=2e-3, weight_decay=0.01,
        report_to=[], save_strategy="no", logging_steps=20, use_cpu=True, disable_tqdm=True,
    )
    transformers.Trainer(model=model, args=args, train_dataset=Images(train), callbacks=list(callbacks)).train()


def main(argv: list[str] | None = None) -> dict[str, float | bool]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=10000, help="training images (the test set is all 10,000)")
    parser.add_argument("--dense-epochs", type=int, default=5)
    parser.add_argument("--admm-epochs", type=int, default=2)
    parser.add_argument("--finetune-epochs", type=int, default=1)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    train = load_dataset("fashion_mnist", "train", limit=args.limit)
    test = load_dataset("fashion_mnist", "test")
    config = transformers.ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=64,
                                    num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, num_labels=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.ViTForImageClassification(config)
    with tempfile.TemporaryDirectory() as folder:
        fit(model, train, args.dense_epochs, folder)
        dense = accuracy(model, test)
        plan = Plan([Rule(NM(n=2, m=4), match="*mlp.fc*")])  # both FFN layers of every block
        callback = ADMMTrainerCallback(plan, admm_epochs=args.admm_epochs, options={"rho": 1e-2, "rho_max": 1.0},
                                       update_every_steps=10)
        fit(model, train, args.admm_epochs + args.finetune_epochs, folder, [callback])
    pruned = accuracy(model, test)
    runs_ok = all(
        int((m.weight.detach().reshape(-1, 4) != 0).sum(1).max()) <= 2
        for name, m in model.named_modules() if name.endswith(("mlp.fc1", "mlp.fc2"))
    )
    print(f"dense ViT: {dense:.2f}%  |  FFNs at 2:4 after ADMM + masked fine-tune: {pruned:.2f}%  "
          f"(2:4 pattern holds: {runs_ok}; {args.limit} training images, test set of {len(test.y)})")
    return {"dense_accuracy": dense, "pruned_accuracy": pruned, "pattern_holds": runs_ok}


if __name__ == "__main__":
    main()
