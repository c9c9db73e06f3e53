"""LeNet-5 / MNIST at the published rates, mean and spread over seeds (issue 18).

    python benchmarks/lenet5_published_rates.py --seeds 0 1 2 --threads 1        # every part, seed after seed
    python benchmarks/lenet5_published_rates.py --only progressive --seeds 1     # one part, one seed
    python benchmarks/lenet5_published_rates.py --summary                        # the table from finished runs

The rows (accuracy on the 10,000 MNIST test images; drops against our dense 99.39%, the papers' dense is 99.2%):

- **progressive ADMM, 246x** (Ye et al. 1903.09769) **and 348x** (ADMM-NN-S): ``configs/lenet5_progressive_348x.yaml``,
  one run from the dense model through 71.2x, its steps 5 and 6 (71 epochs in all).
- **joint pruning + quantization toward 1,910x** (paper-style storage, Ye et al. 1811.01907):
  ``configs/lenet5_quantize_176x.yaml`` from step 4 (176x) of the same seed's progressive run; paper-style and
  honest storage (indices and codebooks counted) side by side.
- **filter + column ADMM with purification and unused-path removal toward 232x** (P-RM):
  ``benchmarks/structured_lenet5.py --stages 5 --admm-epochs 6 --retrain-epochs 6``: every stage, compression of
  the pruned layers and accuracy, compacted (stages 4 and 5 are at about 196x and 344x).

Every part is a folder under ``--out`` that survives a kill: the progressive and quantization runs continue with
``admmcompress run --resume`` (this script passes it when a checkpoint is there), ``structured_lenet5.py`` skips
its finished stages. A finished part is skipped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import yaml
from structured_common import mean_sd

ROOT = Path(__file__).resolve().parents[1]
PROGRESSIVE = ROOT / "configs" / "lenet5_progressive_348x.yaml"
QUANTIZE = ROOT / "configs" / "lenet5_quantize_176x.yaml"
PARTS = ("progressive", "quantize", "structured")
DENSE = 99.39  # checkpoints/lenet5_mnist_dense.safetensors (RESULTS.md, issue 3)


def cli_run(config: Path, seed: int, threads: int, out: Path) -> None:
    """``admmcompress run`` in its own process (resumed when the folder holds a checkpoint)."""
    if (out / "metrics.json").is_file():
        print(f"{out.name}: finished before", flush=True)
        return
    # a checkpoint: continue; a folder without one (killed before the first epoch ended): start it again
    resume = ["--resume"] if (out / "checkpoint.pt").is_file() else ["--overwrite"] if out.exists() else []
    command = [sys.executable, "-m", "admmcompress", "run", str(config), "--seed", str(seed), "--threads",
               str(threads), "--out", str(out), "--no-progress", *resume]
    print("$ " + " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True)


def progressive(seed: int, threads: int, out: Path) -> None:
    cli_run(PROGRESSIVE, seed, threads, out / f"progressive_s{seed}")


def quantize(seed: int, threads: int, out: Path) -> None:
    start = out / f"progressive_s{seed}" / "stages" / "stage4.safetensors"
    if not start.is_file():
        raise SystemExit(f"quantize: {start} is missing; run --only progressive --seeds {seed} first")
    config = yaml.safe_load(QUANTIZE.read_text())
    config["pretrained"] = str(start.resolve())  # this seed's 176x model instead of the config's default
    derived = out / f"quantize176_s{seed}.yaml"
    derived.write_text(yaml.safe_dump(config, sort_keys=False))
    cli_run(derived, seed, threads, out / f"quantize176_s{seed}")


def structured(seed: int, threads: int, out: Path) -> None:
    command = [sys.executable, str(ROOT / "benchmarks" / "structured_lenet5.py"), "--stages", "5", "--admm-epochs", "6",
               "--retrain-epochs", "6", "--threads", str(threads), "--seed", str(seed), "--out",
               str(out / f"structured_s{seed}")]
    print("$ " + " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True)


def _drop(values: list[float]) -> str:
    return f"{DENSE - statistics.mean(values):.2f}"


def run_metrics(path: Path) -> dict:
    """A run's metrics: metrics.json holds them under "metrics" (beside the history and checksums)."""
    data = json.loads(path.read_text())
    return data["metrics"] if "metrics" in data else data


def summary(out: Path) -> str:
    """One row per published target, mean +- sd over the finished seeds."""
    lines = ["| row | published | compression (mean) | accuracy %, mean +- sd (seeds) | drop vs 99.39 | storage |",
             "|---|---|---:|---:|---:|---|"]
    runs = [run_metrics(p) for p in sorted(out.glob("progressive_s*/metrics.json"))]
    for step, name, published in ((4, "progressive ADMM, step 5", "246x"), (5, "progressive ADMM, step 6", "348x")):
        stages = [r["stages"][step] for r in runs]
        if stages:
            acc = [s["accuracy_after_retrain"] for s in stages]
            rate = statistics.mean(s["overall_compression"] for s in stages)
            lines.append(f"| {name} | {published} (almost) no loss | {rate:.1f}x | {mean_sd(acc)} | {_drop(acc)} | - |")
    quant = [run_metrics(p) for p in sorted(out.glob("quantize176_s*/metrics.json"))]
    if quant:
        acc = [q["accuracy_after"] for q in quant]
        store = quant[0]["storage"]
        paper = statistics.mean(q["storage"]["paper_reduction"] for q in quant)
        honest = statistics.mean(q["storage"]["storage_reduction"]["best"] for q in quant)
        lines.append(f"| 176x pruning + 4/3/2/3-bit ADMM quantization | 1,910x storage, no loss | "
                     f"{store['weight_reduction']:.1f}x weights | {mean_sd(acc)} | {_drop(acc)} | "
                     f"paper-style {paper:.0f}x, honest {honest:.0f}x |")
    results: dict[int, list[dict]] = {}
    for path in sorted(out.glob("structured_s*/stage*/result.json")):
        r = json.loads(path.read_text())
        results.setdefault(r["stage"], []).append(r)
    for stage, rs in sorted(results.items()):
        acc = [r["accuracy"] for r in rs]
        rate = statistics.mean(r["overall_compression"] for r in rs)
        b1 = statistics.mean(r["latency"]["1"]["speedup"] for r in rs)  # JSON keys: batch sizes as strings
        lines.append(f"| filter + column, purified, stage {stage} | 232x no loss | {rate:.1f}x | {mean_sd(acc)} | "
                     f"{_drop(acc)} | compacted, {b1:.2f}x faster at batch 1 |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "lenet5_published")
    parser.add_argument("--summary", action="store_true", help="print the table from finished runs and exit")
    args = parser.parse_args()
    if not args.summary:
        args.out.mkdir(parents=True, exist_ok=True)
        steps = {"progressive": progressive, "quantize": quantize, "structured": structured}
        for seed in args.seeds:
            for part in PARTS:  # in this order: quantize starts from the progressive run's step 4
                if part in args.only:
                    steps[part](seed, args.threads, args.out)
    print(summary(args.out))
    print(f"\nrerun: python benchmarks/lenet5_published_rates.py {' '.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
