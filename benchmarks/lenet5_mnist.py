"""LeNet-5 / MNIST: ADMM vs gradual magnitude pruning, one-shot (71.2x) and progressive.

Runs the configs below with the CLI (each in its own process, results in runs/bench/<name>),
then prints the side-by-side tables from each run's metrics.json:

    python benchmarks/lenet5_mnist.py                    # everything (about an hour on 2 cores)
    python benchmarks/lenet5_mnist.py --only admm_71x    # one experiment
    python benchmarks/lenet5_mnist.py --summarize        # tables from finished runs, no training

Accuracy drop is measured against the dense model the runs start from (its accuracy is
re-measured by each run as accuracy_before).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = {
    "admm_71x": "configs/lenet5_admm_71x.yaml",
    "gradual_71x": "configs/lenet5_gradual_71x.yaml",
    "progressive_admm": "configs/lenet5_progressive_admm.yaml",
    "progressive_gradual": "configs/lenet5_progressive_gradual.yaml",
}
ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824"}


def run(name: str, out_root: Path) -> None:
    out = out_root / name
    cmd = [sys.executable, "-m", "admmcompress.cli", "run", str(ROOT / EXPERIMENTS[name]), "--out", str(out),
           "--no-progress"]
    if (out / "checkpoint.pt").exists():
        cmd.append("--resume")
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, **ENV}, cwd=ROOT)


def load(name: str, out_root: Path) -> dict | None:
    path = out_root / name / "metrics.json"
    return json.loads(path.read_text())["metrics"] if path.is_file() else None


def stage_rows(metrics: dict) -> list[tuple[float, float]]:
    """(compression, accuracy after retrain) per stage."""
    return [(s["overall_compression"], s["accuracy_after_retrain"]) for s in metrics["stages"] if s]


def summarize(out_root: Path) -> str:
    lines = []
    results = {name: load(name, out_root) for name in EXPERIMENTS}
    dense = next((m["accuracy_before"] for m in results.values() if m), None)
    if dense is not None:
        lines.append(f"Dense LeNet-5 top-1: {dense:.2f}%\n")
    lines += ["| schedule | stage | compression | ADMM acc. | drop | gradual-magnitude acc. | drop |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for label, admm_key, grad_key in (("one-shot 71.2x", "admm_71x", "gradual_71x"),
                                      ("progressive", "progressive_admm", "progressive_gradual")):
        admm, grad = results[admm_key], results[grad_key]
        rows_a = stage_rows(admm) if admm else []
        rows_g = stage_rows(grad) if grad else []
        for i in range(max(len(rows_a), len(rows_g))):
            a = rows_a[i] if i < len(rows_a) else None
            g = rows_g[i] if i < len(rows_g) else None
            rate = (a or g)[0]
            lines.append(
                f"| {label} | {i + 1} | {rate:.1f}x | {_acc(a, admm)} | {_drop(a, admm)} | {_acc(g, grad)} | {_drop(g, grad)} |"
            )
    for key in ("progressive_admm", "progressive_gradual"):
        m = results[key]
        if not m:
            continue
        rows = stage_rows(m)
        for limit in (0.1, 0.3):
            ok = [rate for rate, acc in rows if m["accuracy_before"] - acc <= limit + 1e-9]
            best = f"{max(ok):.1f}x" if ok else "none"
            lines.append(f"\n{key}: highest compression with drop <= {limit} points: {best}")
        lines.append(f"{key}: wall time {m.get('wall_seconds', 0) / 60:.1f} min")
    return "\n".join(lines)


def _acc(row, metrics) -> str:
    return "-" if row is None else f"{row[1]:.2f}%"


def _drop(row, metrics) -> str:
    return "-" if row is None else f"{metrics['accuracy_before'] - row[1]:+.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(EXPERIMENTS), action="append")
    parser.add_argument("--summarize", action="store_true", help="only print tables from finished runs")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench"))
    args = parser.parse_args()
    out_root = Path(args.out)
    if not args.summarize:
        for name in args.only or EXPERIMENTS:
            run(name, out_root)
    print(summarize(out_root))
    print(f"\nrerun: python benchmarks/lenet5_mnist.py {' '.join('--only ' + o for o in args.only or [])}".rstrip())


if __name__ == "__main__":
    main()
