"""Automatic per-block head counts and FFN widths for a ViT, in your own loop (SS-Auto, method ``soft``).

    python examples/ss_auto_vit.py [--limit 10000] [--dense-epochs 4] [--soft-epochs 2] [--retrain-epochs 1]

A small ViT (``transformers.ViTForImageClassification`` from a config: nothing is downloaded) is trained on
Fashion-MNIST, then given a budget of 2x fewer Linear/Conv MACs instead of rates (the attention products are
not counted): one group-lasso strength, adapted
at every update to meet the budget, decides which attention heads (query, key and value rows with the output
projection's columns) and which FFN units of every block go. The pruned groups are removed physically
(``compact``; the outputs are checked against the masked model) and the rates found are written as a plan
that reruns them with any driver. Prints accuracies, the heads and FFN units kept per block, and MACs.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import torch
import transformers
from torch import nn

from admmcompress.data import BatchLoader, load_dataset
from admmcompress.drivers.allocation import rates_plan, write_rates_plan
from admmcompress.drivers.soft import SoftConfig, SoftThreshold
from admmcompress.executors.compact import compact
from admmcompress.executors.compact_run import count_macs
from admmcompress.plan import Plan


def accuracy(model: nn.Module, split) -> float:
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(pixel_values=x).logits for x in split.x.split(500)])
    model.train()
    return 100.0 * float((logits.argmax(1) == split.y).float().mean())


def epochs(model, loader, count: int, opt, penalty=None, after_epoch=None) -> None:
    model.train()
    for _ in range(count):
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(pixel_values=x).logits, y)
            if penalty is not None:
                loss = loss + penalty()
            opt.zero_grad()
            loss.backward()
            opt.step()
        if after_epoch is not None:
            after_epoch()


def kept(model: nn.Module) -> list[tuple[int, int]]:
    """(heads, FFN units) of every block, read from the layer shapes."""
    out = []
    for block in model.vit.layers:
        out.append((block.attention.q_proj.out_features // block.attention.head_dim, block.mlp.fc1.out_features))
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=10000, help="training images (the test set is all 10,000)")
    parser.add_argument("--dense-epochs", type=int, default=4)
    parser.add_argument("--soft-epochs", type=int, default=2)
    parser.add_argument("--retrain-epochs", type=int, default=1)
    parser.add_argument("--reduction", type=float, default=2.0, help="fewer Linear MACs, the budget")
    parser.add_argument("--out", type=Path, default=None, help="folder for rates.yaml (default: a temporary one)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    train = load_dataset("fashion_mnist", "train", limit=args.limit)
    test = load_dataset("fashion_mnist", "test")
    config = transformers.ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=64,
                                    num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, num_labels=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.ViTForImageClassification(config)
    loader = BatchLoader(train, 64, seed=0)
    epochs(model, loader, args.dense_epochs, torch.optim.Adam(model.parameters(), 2e-3))
    dense = accuracy(model, test)

    example = train.x[:2]
    plan = Plan.from_dict({"rules": [
        {"match": "*attention.q_proj", "structure": "heads", "sparsity": 0.75},  # at least one head per block
        {"match": "*mlp.fc1", "structure": "filter", "sparsity": 0.9},          # FFN units (fc1 rows + fc2 columns)
    ]})
    targets = plan.resolve_coupled(model.eval(), example)
    updates = 4 * args.soft_epochs
    soft = SoftThreshold(model, targets, SoftConfig(budget={"kind": "macs", "reduction": args.reduction}, rho=0.05),
                         example=example, updates=updates)  # (1) the soft-constraint state
    steps = len(loader)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    model.train()
    for _ in range(args.soft_epochs):
        for i, (x, y) in enumerate(loader):
            loss = nn.functional.cross_entropy(model(pixel_values=x).logits, y) + soft.penalty()  # (2) penalty
            opt.zero_grad()
            loss.backward()
            opt.step()
            if (i + 1) % max(1, steps // 4) == 0 and soft.iteration < updates:
                soft.step()  # (3) Z = group soft-threshold of W + U at the adapted strength; U += W - Z
    masks = soft.finalize()  # groups whose Z is zero are pruned; the budget is met
    found = soft.summary()["soft"]
    retrain = torch.optim.Adam(model.parameters(), 1e-3)
    masks.attach(model, retrain)
    epochs(model, loader, args.retrain_epochs, retrain)
    pruned = accuracy(model, test)

    model.eval()
    with torch.no_grad():
        small = compact(model, example, masks).model  # checks its outputs against the masked model
        agree = bool(torch.allclose(small(pixel_values=test.x[:64]).logits, model(pixel_values=test.x[:64]).logits,
                                    rtol=1e-4, atol=1e-4))
    macs = count_macs(model, example[:1]) / count_macs(small, example[:1])
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.out or Path(tmp)
        path = write_rates_plan(Path(folder) / "rates.yaml", rates_plan(model, targets),
                                comment=f"SS-Auto rates for a ViT at {args.reduction:g}x fewer Linear MACs")
        rates_text = path.read_text()
    blocks = kept(small)
    print(f"dense ViT {dense:.2f}% -> {pruned:.2f}% after SS-Auto at {args.reduction:g}x fewer Linear MACs "
          f"(compacted: {macs:.2f}x fewer Linear/Conv MACs); heads / FFN units kept per block: {blocks} of "
          f"(4, 128); soft threshold share {found['share_soft_threshold']:.0%}; compacted outputs agree: {agree}")
    print(rates_text)
    return {"dense_accuracy": dense, "pruned_accuracy": pruned, "blocks": blocks, "mac_reduction": macs,
            "agree": agree, "share_soft_threshold": found["share_soft_threshold"], "rates": rates_text}


if __name__ == "__main__":
    main()
