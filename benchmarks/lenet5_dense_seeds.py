"""LeNet-5 / MNIST: how much the dense recipe varies with the seed, and what an ensemble of its seeds scores.

Every 71.2x drop in RESULTS.md is measured against one dense model (the bundled checkpoint, seed 0 of
configs/lenet5_dense.yaml). This trains the same recipe with other seeds and prints each model's test accuracy,
their mean and spread, and the accuracy of logit ensembles of the first k models (the ensemble teacher of
benchmarks/experiments/lenet5_71x_finetune_ensemble_kd.yaml is the first five):

    python benchmarks/lenet5_dense_seeds.py --seeds 1 2 3 4 5 6 7 8 9 --jobs 4   # train, then summarize
    python benchmarks/lenet5_dense_seeds.py --summarize                         # only summarize finished runs

Seed 0 is the bundled checkpoint (trained with 2 threads); the others are trained with 1 thread each
(another thread count changes float summation order, not the recipe). Runs go to runs/exp/s13/dense_sN.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from admmcompress.data import load_dataset
from admmcompress.models import create_model
from admmcompress.train import checkpoint as ckpt
from admmcompress.train.loop import evaluate
from admmcompress.train.teacher import LogitEnsemble

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "checkpoints" / "lenet5_mnist_dense.safetensors"
OUT_ROOT = ROOT / "runs" / "exp" / "s13"


def checkpoint_of(seed: int) -> Path:
    return BUNDLED if seed == 0 else OUT_ROOT / f"dense_s{seed}" / "model.safetensors"


def train(seed: int) -> None:
    out = OUT_ROOT / f"dense_s{seed}"
    cmd = [sys.executable, "-m", "admmcompress.cli", "run", str(ROOT / "configs" / "lenet5_dense.yaml"),
           "--seed", str(seed), "--threads", "1", "--out", str(out), "--no-progress"]
    if (out / "checkpoint.pt").exists():
        cmd.append("--resume")
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)


def load(seed: int) -> torch.nn.Module:
    model = create_model(name="lenet5")
    ckpt.load_weights(model, checkpoint_of(seed))
    return model.eval()


def summarize(limit: int | None = None) -> str:
    """The table; ``limit`` evaluates on the first test images only (for tests)."""
    seeds = [s for s in range(100) if checkpoint_of(s).is_file()]
    test = load_dataset("mnist", "test", limit=limit)
    models = {s: load(s) for s in seeds}
    accuracy = {s: evaluate(m, test) for s, m in models.items()}
    lines = ["| seed | test accuracy (%) |", "|---|---|"]
    lines += [f"| {s}{' (bundled)' if s == 0 else ''} | {accuracy[s]:.2f} |" for s in seeds]
    values = list(accuracy.values())
    if len(values) > 1:
        lines.append(f"\n{len(values)} seeds: mean {statistics.mean(values):.3f}%, sd {statistics.stdev(values):.3f}, "
                     f"min {min(values):.2f}, max {max(values):.2f}")
    for k in sorted({5, len(seeds)}):
        if k <= len(seeds) and k > 1:
            ensemble = LogitEnsemble([models[s] for s in seeds[:k]]).eval()
            lines.append(f"logit ensemble of seeds {seeds[0]}..{seeds[k - 1]}: {evaluate(ensemble, test):.2f}%")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="*", default=[], help="dense seeds to train (0 is bundled)")
    parser.add_argument("--jobs", type=int, default=2, help="training runs at a time (1 thread each)")
    parser.add_argument("--summarize", action="store_true", help="only print the table of finished runs")
    args = parser.parse_args()
    if not args.summarize:
        todo = [s for s in args.seeds if s != 0]
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(train, todo))
    torch.set_num_threads(1)
    print(summarize())
    print("\nrerun: python benchmarks/lenet5_dense_seeds.py --summarize")


if __name__ == "__main__":
    main()
