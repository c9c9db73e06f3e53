"""CIFAR-10 ResNet-20: block pruning vs filter pruning at the same parameter count, 3 seeds (issue 18).

    python benchmarks/block_cifar.py --rates 4 8 --seeds 0 --threads 1 --out runs/block_cifar   # one seed
    python benchmarks/block_cifar.py --summary --out runs/block_cifar                            # mean +- sd

Starts from the shipped dense ResNet-20 (``checkpoints/resnet20_cifar10_dense.safetensors``, 88.39%). The
18 3x3 convs of the residual blocks (``layers.*.conv*``: 98% of the weights; not the 1x1 shortcut convs) are
pruned at each rate with ``Block(block=(8, 1))`` (8-row block-columns of the GEMM matrix, the compiled
block-sparse kernel's tile) or ``Filter`` (whole GEMM rows, each layer on its own): the same number of weights
is kept in both, up to the rounding to whole rows. The first conv and the classifier stay dense. Masks only:
filter pruning without coupling cannot be compacted through the residual additions (the coupled-filter table
does that), and the block pattern needs the block-sparse executor for speed; this table compares accuracy at
equal weights.

Same method and budget for both, on the run config of ``configs/resnet20_cifar_filter_admm.yaml`` shortened to
``--admm-epochs`` (3) of ADMM (rho 0.1 x1.3 per quarter-epoch update up to 1, as the coupled-filter table;
SGD lr 0.01 constant) and
``--retrain-epochs`` (3) of masked retraining (cosine, label smoothing 0.1), bf16 autocast + channels_last, all
50,000 training images with shifts and flips; test on all 10,000, once per run. Each run is a folder
(``--out/<structure>_<rate>x_seed<seed>``) that ``admmcompress report --compare`` reads; ``results.jsonl``
collects one line per run.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import json
import statistics
import time
from pathlib import Path

import torch
import yaml
from bench_runs import run_in_folder
from structured_common import command_line, ensure_malloc_env, machine, mean_sd, read_jsonl

from admmcompress.data import Split, load_dataset
from admmcompress.models import create_model
from admmcompress.train import checkpoint as ckpt
from admmcompress.train.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "configs" / "resnet20_cifar_filter_admm.yaml"
DENSE = ROOT / "checkpoints" / "resnet20_cifar10_dense.safetensors"
BLOCK = [8, 1]
LAYERS = "layers.*.conv*"


def run_config(structure: str, rate: float, seed: int, args: argparse.Namespace, steps: int) -> RunConfig:
    """The template config with this structure, rate, seed and epoch budget (no coupling, no compaction)."""
    config = yaml.safe_load(TEMPLATE.read_text())
    config.update(name=f"{structure} {rate:g}x seed {seed}", seed=seed, threads=args.threads, pretrained="<in-memory>")
    config.pop("compact", None)
    stage = config["stages"][0]
    extra = {"block": BLOCK} if structure == "block" else {}
    stage["plan"] = {"rules": [{"match": LAYERS, "type": "Conv2d", "structure": structure, "compression": rate,
                                **extra}]}
    stage["coupling"] = "none"
    stage["options"] = {"rho": args.rho, "rho_growth": 1.3, "rho_max": 1.0}
    stage["admm"].update(epochs=args.admm_epochs, update_every_steps=max(1, steps // 4))
    stage["retrain"]["epochs"] = args.retrain_epochs
    return RunConfig.from_dict(config)


def subset(data: Split, limit: int) -> Split:
    """A seeded random ``limit`` of ``data`` (all when 0): the files are sorted by class, so no first-N slices."""
    if not limit:
        return data
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(1234))[:limit]
    return Split(data.x[order], data.y[order], data.source)


def targeted_weights(model: torch.nn.Module) -> tuple[int, int]:
    """(kept, total) weights of the pruned convs (not the 1x1 shortcut convs)."""
    kept = total = 0
    for name, module in model.named_modules():
        if fnmatch.fnmatch(name, LAYERS) and isinstance(module, torch.nn.Conv2d):
            kept += int((module.weight != 0).sum())
            total += module.weight.numel()
    return kept, total


def summary(out: Path) -> str:
    if not (out / "results.jsonl").is_file():
        return f"no results in {out / 'results.jsonl'}"
    rows = read_jsonl(out / "results.jsonl")
    latest = {(r["structure"], r["rate"], r["seed"]): r for r in rows}
    lines = ["| structure | rate (block convs) | kept weights (block convs) | acc. after hard prune | "
             "test top-1 (%), mean +- sd (seeds) | drop vs dense |", "|---|---:|---:|---:|---:|---:|"]
    for rate in sorted({k[1] for k in latest}):
        for structure in ("block", "filter"):
            rs = [r for k, r in sorted(latest.items()) if k[:2] == (structure, rate)]
            if not rs:
                continue
            acc = [r["accuracy"] for r in rs]
            kept = statistics.mean(r["kept_weights"] for r in rs)
            hard = statistics.mean(r["accuracy_after_hard_prune"] for r in rs)
            lines.append(f"| {structure} | {rate:g}x | {kept:,.0f} of {rs[0]['total_weights']:,} | {hard:.2f} | "
                         f"{mean_sd(acc)} | "
                         f"{rs[0]['dense_accuracy'] - statistics.mean(acc):.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structures", nargs="+", default=["block", "filter"], choices=["block", "filter"])
    parser.add_argument("--rates", type=float, nargs="+", default=[4.0, 8.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--admm-epochs", type=int, default=3)
    parser.add_argument("--retrain-epochs", type=int, default=3)
    parser.add_argument("--train-limit", type=int, default=0, help="a seeded random N training images (0: all)")
    parser.add_argument("--test-limit", type=int, default=0, help="a seeded random N test images (0: all)")
    parser.add_argument("--rho", type=float, default=0.1, help="initial rho (x1.3 per update, up to 1)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "block_cifar")
    parser.add_argument("--summary", action="store_true", help="print the table from results.jsonl and exit")
    args = parser.parse_args()
    if args.summary:
        print(summary(args.out))
        return
    ensure_malloc_env()
    torch.set_num_threads(args.threads)
    train = subset(load_dataset("cifar10", "train"), args.train_limit)
    test = subset(load_dataset("cifar10", "test"), args.test_limit)
    dense = create_model("resnet20").eval()
    ckpt.load_weights(dense, DENSE)
    steps = (len(train) + 127) // 128
    args.out.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for rate in args.rates:
            for structure in args.structures:
                started = time.perf_counter()
                model = copy.deepcopy(dense)
                folder = args.out / f"{structure}_{rate:g}x_seed{seed}"
                metrics = run_in_folder(run_config(structure, rate, seed, args, steps), model, train, test, folder)
                kept, total = targeted_weights(model)
                record = {
                    "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "command": command_line(),
                    "structure": structure, "rate": rate, "seed": seed,
                    "block": BLOCK if structure == "block" else None,
                    "kept_weights": kept, "total_weights": total, "dense_accuracy": metrics["accuracy_before"],
                    "accuracy_after_hard_prune": metrics["stages"][0]["accuracy_after_hard_prune"],
                    "accuracy": metrics["accuracy_after"], "seconds": round(time.perf_counter() - started),
                }
                with open(args.out / "results.jsonl", "a") as handle:
                    handle.write(json.dumps(record) + "\n")
                print(json.dumps(record), flush=True)
    print(f"\n{summary(args.out)}\n\nrerun: {command_line()}")


if __name__ == "__main__":
    main()
