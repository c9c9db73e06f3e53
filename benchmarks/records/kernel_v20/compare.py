"""Per-point "of the MAC ideal" of the alternating v19 / v20 target runs in this folder (ab_targets.sh), the
targets met per run, and for each point the median of v20's over the median of v19's.

    python benchmarks/records/kernel_v20/compare.py
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

HERE = Path(__file__).parent
BUILDS = ("v19", "v20")


def of_ideal(path: Path) -> dict[tuple[str, int, int], float]:
    return {(p["case"], p["batch"], p["threads"]): p["ms"]["dense"] / p["ms"]["cpp"] / p["real"]
            for p in json.loads(path.read_text())}


def main() -> None:
    runs = {b: [of_ideal(f) for f in sorted(HERE.glob(f"targets_{b}_*.json"))] for b in BUILDS}
    print("| case | batch | threads | v19 runs | v20 runs | v20 / v19 (medians) |")
    print("|---|---:|---:|---|---|---:|")
    for key in runs["v19"][0]:
        cells = [", ".join(f"{run[key]:.2f}" for run in runs[b]) for b in BUILDS]
        gain = statistics.median(r[key] for r in runs["v20"]) / statistics.median(r[key] for r in runs["v19"])
        print(f"| {key[0]} | {key[1]} | {key[2]} | {cells[0]} | {cells[1]} | {gain:.2f} |")
    print()
    for b in BUILDS:
        met = [sum(v >= (0.8 if key[1] == 1 else 0.5) for key, v in run.items()) for run in runs[b]]
        b1 = [sum(v >= 0.8 for key, v in run.items() if key[1] == 1) for run in runs[b]]
        print(f"- {b}: target points met per run {met} of 40; batch 1: {b1} of 20")


if __name__ == "__main__":
    main()
