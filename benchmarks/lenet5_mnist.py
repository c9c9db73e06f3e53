"""LeNet-5 / MNIST: ADMM vs gradual magnitude pruning, one-shot (71.2x) and progressive.

Runs the configs below with the CLI (each in its own process, results in runs/bench/<name>),
then prints the side-by-side tables from each run's metrics.json:

    python benchmarks/lenet5_mnist.py                    # everything (about 2.5 hours on 2 idle cores)
    python benchmarks/lenet5_mnist.py --only admm_71x    # one experiment
    python benchmarks/lenet5_mnist.py --summarize        # tables from finished runs, no training
    python benchmarks/lenet5_mnist.py --only admm_71x --seeds 0 1 2   # the seed spread (runs/bench/admm_71x_seed1, ...)

The progressive runs continue from the 71.2x runs' models. Every accuracy drop is measured
against the dense model the 71.2x runs start from (re-measured by them as accuracy_before).
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
    "progressive_admm": "configs/lenet5_progressive_admm.yaml",  # continues from admm_71x
    "progressive_gradual": "configs/lenet5_progressive_gradual.yaml",  # continues from gradual_71x
    "progressive_admm_kd": "configs/lenet5_progressive_admm_kd.yaml",  # + distillation while retraining
    "admm_71x_kd": "configs/lenet5_admm_71x_kd.yaml",  # + distillation while retraining
    "admm_71x_long": "configs/lenet5_admm_71x_long.yaml",  # 48 ADMM epochs + 10 retrain, distillation
    "admm_71x_progressive": "configs/lenet5_admm_71x_progressive.yaml",  # 29.3x first, then 71.2x; distillation
    "admm_71x_progressive3": "configs/lenet5_admm_71x_progressive3.yaml",  # 12.9x, 29.3x, then 71.2x
    # the two-step recipe, distilling in the ADMM phases too
    "admm_71x_progressive_kd_admm": "configs/lenet5_admm_71x_progressive_kd_admm.yaml",
    # the earlier, shorter budget (8 + 6 epochs), for the record
    "admm_71x_short": "configs/lenet5_admm_71x_short.yaml",
    "gradual_71x_short": "configs/lenet5_gradual_71x_short.yaml",
    "admm_71x_rho2e-3": "configs/lenet5_admm_71x_rho2e-3.yaml",  # short budget, gentler rho
}
# The 71.2x variants listed one per line under the tables, with their epoch budgets.
VARIANT_BUDGETS = {
    "admm_71x_kd": "20 + 10 epochs, distillation",
    "admm_71x_long": "48 + 10 epochs, distillation",
    "admm_71x_progressive": "29.3x in 6 + 3 epochs, then 71.2x in 20 + 10, distillation",
    "admm_71x_progressive3": "12.9x in 4 + 2, 29.3x in 6 + 3, 71.2x in 20 + 10, distillation",
    "admm_71x_progressive_kd_admm": "as admm_71x_progressive, distilling in the ADMM phases too",
    "admm_71x_short": "8 + 6 epochs",
    "gradual_71x_short": "8 + 6 epochs",
    "admm_71x_rho2e-3": "8 + 6 epochs",
}
ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824"}


# 71.2x runs with a seed table (the progressive one reaches 71.2x in its last step)
SEEDED = ("admm_71x", "admm_71x_kd", "admm_71x_long", "admm_71x_progressive", "admm_71x_progressive3",
          "admm_71x_progressive_kd_admm", "gradual_71x")


def run_folder(name: str, seed: int | None) -> str:
    """``name`` for the config's own seed (0 in every config here), ``name_seed<N>`` for another."""
    return name if not seed else f"{name}_seed{seed}"


def run(name: str, out_root: Path, threads: int | None, seed: int | None = None) -> None:
    out = out_root / run_folder(name, seed)
    cmd = [sys.executable, "-m", "admmcompress.cli", "run", str(ROOT / EXPERIMENTS[name]), "--out", str(out),
           "--no-progress"] + (["--threads", str(threads)] if threads else [])
    cmd += ["--seed", str(seed)] if seed is not None else []
    if (out / "checkpoint.pt").exists():
        cmd.append("--resume")
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, **ENV}, cwd=ROOT)


def load(name: str, out_root: Path) -> dict | None:
    """Final metrics of a run, or the metrics of its last checkpoint while it is unfinished."""
    path = out_root / name / "metrics.json"
    if path.is_file():
        return json.loads(path.read_text())["metrics"]
    state = out_root / name / "checkpoint.pt"
    if state.is_file():
        import torch

        return torch.load(state, weights_only=True)["metrics"]
    return None


def seed_table(out_root: Path, dense: float) -> list[str]:
    """Per-seed accuracy at 71.2x (a run's last step), with the mean and its drop."""
    lines = ["\n| run | seeds | accuracies | mean | mean drop |", "|---|---:|---|---:|---:|"]
    for name in SEEDED:
        accs = {}
        for folder in sorted(p.name for p in out_root.glob(f"{name}*")):
            seed = 0 if folder == name else folder.removeprefix(f"{name}_seed")
            if folder != name and not str(seed).isdigit():
                continue
            metrics = load(folder, out_root)
            rows = stage_rows(metrics) if metrics else []
            if rows and "accuracy_after" in metrics:  # finished runs only
                accs[int(seed)] = rows[-1][1]
        if accs:
            mean = sum(accs.values()) / len(accs)
            listed = ", ".join(f"{acc:.2f} (seed {seed})" for seed, acc in sorted(accs.items()))
            lines.append(f"| {name} | {len(accs)} | {listed} | {mean:.2f}% | {dense - mean:+.2f} |")
    return lines


def stage_rows(metrics: dict) -> list[tuple[float, float]]:
    """(compression, accuracy after retrain) per stage."""
    return [(s["overall_compression"], s["accuracy_after_retrain"]) for s in metrics["stages"]
            if "accuracy_after_retrain" in s]


def summarize(out_root: Path) -> str:
    lines = []
    results = {name: load(name, out_root) for name in EXPERIMENTS}
    # Progressive runs continue from the 71.2x models, so every drop is measured against the dense
    # model the 71.2x runs started from.
    dense = next((results[k]["accuracy_before"] for k in ("admm_71x", "gradual_71x") if results[k]), None)
    if dense is None:
        return "no finished 71.2x run yet: run --only admm_71x first"
    lines.append(f"Dense LeNet-5 top-1: {dense:.2f}%\n")
    lines += ["| schedule | stage | compression | ADMM acc. | drop | gradual-magnitude acc. | drop |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for label, admm_key, grad_key in (("one-shot 71.2x", "admm_71x", "gradual_71x"),
                                      ("progressive from 71.2x", "progressive_admm", "progressive_gradual")):
        admm, grad = results[admm_key], results[grad_key]
        rows_a = stage_rows(admm) if admm else []
        rows_g = stage_rows(grad) if grad else []
        for i in range(max(len(rows_a), len(rows_g))):
            a = rows_a[i] if i < len(rows_a) else None
            g = rows_g[i] if i < len(rows_g) else None
            rate = (a or g)[0]
            lines.append(
                f"| {label} | {i + 1} | {rate:.1f}x | {_acc(a)} | {_drop(a, dense)} | {_acc(g)} | {_drop(g, dense)} |"
            )
    lines += seed_table(out_root, dense)
    for key, budget in VARIANT_BUDGETS.items():
        variant = results[key]
        if variant and stage_rows(variant):
            rate, acc = stage_rows(variant)[-1]
            lines.append(f"\n{key} ({budget}): {acc:.2f}% at {rate:.1f}x (drop {dense - acc:+.2f})")
    kd = results["progressive_admm_kd"]
    if kd and stage_rows(kd):
        lines.append("\nprogressive ADMM with distillation from the dense model in the retrain phases:")
        lines += [f"  {rate:.1f}x: {acc:.2f}% (drop {dense - acc:+.2f})" for rate, acc in stage_rows(kd)]
    for key in ("progressive_admm", "progressive_gradual", "progressive_admm_kd"):
        m = results[key]
        if not m:
            continue
        start = results["admm_71x" if "admm" in key else "gradual_71x"]
        rows = (stage_rows(start) if start else []) + stage_rows(m)
        for limit in (0.1, 0.3):
            ok = [rate for rate, acc in rows if dense - acc <= limit + 1e-9]
            best = f"{max(ok):.1f}x" if ok else "none"
            lines.append(f"\n{key}: highest compression with drop <= {limit} points: {best}")
        lines.append(f"{key}: wall time {m.get('wall_seconds', 0) / 60:.1f} min")
    return "\n".join(lines)


def _acc(row) -> str:
    return "-" if row is None else f"{row[1]:.2f}%"


def _drop(row, dense: float) -> str:
    return "-" if row is None else f"{dense - row[1]:+.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(EXPERIMENTS), action="append")
    parser.add_argument("--summarize", action="store_true", help="only print tables from finished runs")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench"))
    parser.add_argument("--threads", type=int, help="torch threads per run (default: the config's)")
    parser.add_argument("--seeds", type=int, nargs="+", help="run each experiment once per seed (--seed N)")
    args = parser.parse_args()
    out_root = Path(args.out)
    if not args.summarize:
        for name in args.only or EXPERIMENTS:
            for seed in args.seeds or [None]:
                run(name, out_root, args.threads, seed)
    print(summarize(out_root))
    seeds = f" --seeds {' '.join(map(str, args.seeds))}" if args.seeds else ""
    only = " ".join("--only " + o for o in args.only or [])
    print(f"\nrerun: python benchmarks/lenet5_mnist.py {only}{seeds}".rstrip())


if __name__ == "__main__":
    main()
