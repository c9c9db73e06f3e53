"""Structured pruning speed: dense vs compacted vs the hand-built same-width model ("ideal"), interleaved.

    python benchmarks/structured_speed.py                     # ResNet-18, VGG-16, ResNet-20 at 50% filters
    python benchmarks/structured_speed.py --models resnet20 --sparsity 0.75

Each model is pruned with one coupled filter target on every Conv2d (``Plan.resolve_coupled``,
magnitude hard prune of the random-init weights: speed does not depend on the values), compacted
(``compact``, outputs checked against the masked model), and timed at batch 1 and 64 against the
dense model and the model built directly at ``width_mult = 1 - sparsity`` (same layer widths as the
compacted one, checked). Target: compacted >= 0.95x the ideal's speed. The malloc thresholds of
BENCHMARKING.md are set by re-executing the script; 2 threads.
"""

from __future__ import annotations

import argparse
import datetime
import json

import torch
from structured_common import command_line, ensure_malloc_env, interleaved_ms, machine, macs, params

from admmcompress.executors.compact import compact
from admmcompress.finalize import hard_prune
from admmcompress.models import create_model
from admmcompress.plan import Plan, Rule
from admmcompress.structures import Filter


def prune_and_compact(name: str, sparsity: float):
    torch.manual_seed(0)
    dense = create_model(name).eval()
    x = torch.randn(2, *dense.input_shape)
    targets = Plan([Rule(Filter(sparsity=sparsity), type="Conv2d")]).resolve_coupled(dense, x)
    masked = create_model(name).eval()
    masked.load_state_dict(dense.state_dict())
    masks = hard_prune(masked, targets)
    result = compact(masked, x, masks)
    ideal = create_model(name, width_mult=1.0 - sparsity).eval()
    same = {k: v.shape for k, v in result.model.state_dict().items()} == {
        k: v.shape for k, v in ideal.state_dict().items()
    }
    return dense, result, ideal, same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18_cifar", "vgg16_cifar", "resnet20"])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--threads", type=int, default=2, help="BENCHMARKING.md: 2 (the core count)")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    ensure_malloc_env()
    torch.set_num_threads(args.threads)
    print(f"# {datetime.date.today()} | {machine()}\n# {command_line()}\n", flush=True)
    rows, records = [], []
    for name in args.models:
        dense, result, ideal, same = prune_and_compact(name, args.sparsity)
        small = result.model.eval()
        for batch in args.batches:
            x = torch.randn(batch, *dense.input_shape)
            contenders = {"dense": dense, "compacted": small, "ideal": ideal}
            ms = interleaved_ms(
                {k: (lambda m=m, x=x: m(x)) for k, m in contenders.items()}, rounds=args.rounds
            )
            record = {
                "model": name,
                "sparsity": args.sparsity,
                "batch": batch,
                "ms": ms,
                "params": {"dense": params(dense), "compacted": params(small), "ideal": params(ideal)},
                "macs": {"dense": macs(dense, x), "compacted": macs(small, x), "ideal": macs(ideal, x)},
                "same_widths_as_ideal": same,
                "max_abs_diff_vs_masked": result.max_abs_diff,
            }
            records.append(record)
            rows.append(
                f"| {name} | {batch} | {record['params']['dense']:,} / {record['params']['compacted']:,} | "
                f"{record['macs']['dense'] / 1e6:.1f} / {record['macs']['compacted'] / 1e6:.1f} | "
                f"{ms['dense']:.2f} | {ms['compacted']:.2f} | {ms['ideal']:.2f} | "
                f"{ms['dense'] / ms['compacted']:.2f}x | {ms['ideal'] / ms['compacted']:.2f} | {same} |"
            )
            print(rows[-1], flush=True)
    print(
        "\n| model | batch | params dense / compacted | MMACs dense / compacted | dense ms | "
        "compacted ms | ideal ms | speedup | compacted speed / ideal speed | same widths as ideal |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    print("\n".join(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
