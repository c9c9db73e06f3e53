"""Per-point "of the MAC ideal" of the grid runs of kernel v11 (blocksparse_grid_3) against v14 and v16 (this folder;
v16 differs from v14 only in the im2col product, which the grid does not run).

    python benchmarks/records/blocksparse_fused_input/compare_grids.py
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

HERE = Path(__file__).parent
SETS = {
    "v11, native": HERE.parent / "blocksparse_grid_3" / "split_native_*.json",
    "v14/v16, native": HERE / "grid_v1[46]_native_*.json",
    "v11, haswell build": HERE.parent / "blocksparse_grid_3" / "split_haswell_*.json",
    "v14/v16, haswell build": HERE / "grid_v1[46]_haswell_*.json",
}


def main() -> None:
    runs = {name: [json.loads(Path(f).read_text()) for f in sorted(glob.glob(str(pattern)))]
            for name, pattern in SETS.items()}
    ideal = {name: [{(p["case"], p["batch"], p["threads"]): p["ms"]["dense"] / p["ms"]["cpp"] / p["real"]
                     for p in run} for run in rs] for name, rs in runs.items()}
    print("| case | batch | threads | " + " | ".join(SETS) + " |")
    print("|---|---:|---:|" + "---|" * len(SETS))
    for key in ideal["v14/v16, native"][0]:
        cells = [", ".join(f"{run[key]:.2f}" for run in rs) for rs in ideal.values()]
        print(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
    print()
    for name, rs in ideal.items():
        met = [sum(v >= (0.8 if key[1] == 1 else 0.5) for key, v in run.items()) for run in rs]
        print(f"- {name}: target points met per run: {met} of 40")


if __name__ == "__main__":
    main()
