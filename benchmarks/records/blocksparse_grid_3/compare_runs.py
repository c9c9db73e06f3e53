"""Per-point "of the MAC ideal" of every grid run in this folder, side by side (the tables in RESULTS.md).

    python benchmarks/records/blocksparse_grid_3/compare_runs.py
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

HERE = Path(__file__).parent
SETS = {
    "kernel v10 (a416d50), native": "v10_native_*.json",
    "private transposition, native": "private_native_*.json",
    "slabs, native": "slabs_native_*.json",
    "slabs + batch split (v11), native": "split_native_*.json",
    "kernel v10, haswell build": "v10_haswell_*.json",
    "slabs, haswell build": "slabs_haswell_*.json",
    "slabs + batch split (v11), haswell build": "split_haswell_*.json",
}


def of_ideal(point: dict) -> float:
    return point["ms"]["dense"] / point["ms"]["cpp"] / point["real"]


def main() -> None:
    runs = {name: [json.loads(Path(f).read_text()) for f in sorted(glob.glob(str(HERE / pattern)))]
            for name, pattern in SETS.items()}
    keys = [(p["case"], p["batch"], p["threads"]) for p in next(iter(runs.values()))[0]]
    print("| case | batch | threads | " + " | ".join(SETS) + " |")
    print("|---|---:|---:|" + "---|" * len(SETS))
    for key in keys:
        cells = [", ".join(f"{of_ideal(p):.2f}" for run in rs for p in run
                           if (p["case"], p["batch"], p["threads"]) == key) for rs in runs.values()]
        print(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
    print()
    for name, rs in runs.items():
        met = [sum(of_ideal(p) >= (0.8 if p["batch"] == 1 else 0.5) for p in run) for run in rs]
        print(f"- {name}: target points met per run {met} of {len(keys)}")


if __name__ == "__main__":
    main()
