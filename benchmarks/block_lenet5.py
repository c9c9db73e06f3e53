"""LeNet-5 / MNIST: block pruning vs filter pruning at the same parameter count (10x / 20x / 40x / 80x).

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 python benchmarks/block_lenet5.py

Starts from ``checkpoints/lenet5_mnist_dense.safetensors`` (99.39%). conv2 (GEMM 50 x 500) and fc1
(500 x 800), 98% of the weights, are pruned at the rate with either ``Block(block=(10, 1))`` (10-row
block-columns) or ``Filter`` (whole rows): the same number of weights is kept in both (rows of 500 / 800
weights vs block-columns of 10). Same method and budget for both: gradual magnitude pruning (cubic
schedule, an update every quarter epoch) for ``--prune-epochs``, then ``--retrain-epochs`` of masked
retraining (Adam 1e-3), on the first ``--train-limit`` training images (CPU budget); test on all 10,000.
Masks only: filter pruning could also be compacted (smaller dense layers), block pruning needs the
block-sparse executor for speed. Each setting is a run folder (``--out/<structure>_<rate>x``, as
``admmcompress run`` writes); the table is ``admmcompress report --compare`` over them.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from bench_runs import run_in_folder, table
from safetensors.torch import load_file

from admmcompress.data import load_dataset
from admmcompress.models import LeNet5
from admmcompress.train.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
MALLOC = "MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824"


def rules(structure: str, rate: float) -> list[dict]:
    extra = {"block": [10, 1]} if structure == "block" else {}
    return [
        {"match": layer, "structure": structure, "compression": rate, **extra} for layer in ("conv2", "fc1")
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structures", nargs="+", default=["block", "filter"], choices=["block", "filter"])
    parser.add_argument("--rates", type=float, nargs="+", default=[10, 20, 40, 80])
    parser.add_argument("--prune-epochs", type=int, default=2)
    parser.add_argument("--retrain-epochs", type=int, default=2)
    parser.add_argument("--train-limit", type=int, default=20000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs/block_lenet5")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train = load_dataset("mnist", "train", limit=args.train_limit)
    test = load_dataset("mnist", "test")
    dense = LeNet5()
    dense.load_state_dict(load_file(ROOT / "checkpoints" / "lenet5_mnist_dense.safetensors"))
    steps = (len(train) + 63) // 64
    results = Path(args.out) / "results.jsonl"
    results.parent.mkdir(parents=True, exist_ok=True)
    folders: list[Path] = []
    for structure in args.structures:
        for rate in args.rates:
            rate = int(rate) if float(rate).is_integer() else rate
            stage = {
                "plan": {"rules": rules(structure, rate)},
                "method": "gradual",
                "admm": {"epochs": args.prune_epochs, "update_every_steps": max(1, steps // 4)},
                "retrain": {"epochs": args.retrain_epochs, "optimizer": {"name": "adam", "lr": 1e-3}},
            }
            config = RunConfig.from_dict(
                {
                    "name": f"{structure} {rate}x",
                    "model": {"name": "lenet5"},
                    "pretrained": "<in-memory>",
                    "stages": [stage],
                    "seed": 0,
                }
            )
            started = time.perf_counter()
            folder = Path(args.out) / f"{structure}_{rate}x"
            metrics = run_in_folder(config, copy.deepcopy(dense), train, test, folder)
            folders.append(folder)
            record = {
                "date": time.strftime("%Y-%m-%d %H:%M"),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                f"{args.threads} thread(s), load avg {os.getloadavg()[0]:.1f}",
                "structure": structure,
                "rate": rate,
                "kept_weights": metrics["stats"]["kept_weights"],
                "compression": metrics["stats"]["overall_compression"],
                "dense_accuracy": metrics["accuracy_before"],
                "accuracy_after_hard_prune": metrics["stages"][0]["accuracy_after_hard_prune"],
                "accuracy": metrics["accuracy_after"],
                "seconds": time.perf_counter() - started,
                "command": f"{MALLOC} python benchmarks/block_lenet5.py {' '.join(sys.argv[1:])}",
            }
            with results.open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)
    command = f"{MALLOC} python benchmarks/block_lenet5.py {' '.join(sys.argv[1:])}"
    print(f"\n{table(folders, Path(args.out) / 'compare.png')}\n")
    print(f"(run folders in {args.out}; the same table: admmcompress report --compare {args.out}/*x/; "
          f"rerun: {command})")


if __name__ == "__main__":
    main()
