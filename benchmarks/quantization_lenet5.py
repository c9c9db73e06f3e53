"""LeNet-5 / MNIST: ADMM pruning + quantization, full binarization, structured vs non-structured storage.

Runs the configs below with the CLI (each in its own process, one at a time, results in
runs/bench_quant/<name>), writes each model as a packed file (``admmcompress export --packed``) and
prints the tables for benchmarks/RESULTS.md from the runs' metrics.json and the files:

    python benchmarks/quantization_lenet5.py                      # everything (~30 min on 2 busy cores)
    python benchmarks/quantization_lenet5.py --only prune_quantize
    python benchmarks/quantization_lenet5.py --summarize          # tables only, no training

Storage follows SPEC 4.2 (report/storage.py): "paper-style" = 32 N / sum(nnz * bits), no index or
codebook; "honest" = each layer's cheapest of dense / bitmask / relative index (with fillers) /
CSR / structured, indices and codebooks counted. Accuracy drops are against the dense model each
run starts from (re-measured by the run as accuracy_before).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

EXPERIMENTS = {
    "quantize_71x": "configs/lenet5_quantize_71x.yaml",  # needs runs/bench/admm_71x (lenet5_mnist.py)
    "quantize_71x_5bit": "configs/lenet5_quantize_71x_5bit.yaml",  # the same, one more bit per layer
    "quantize_71x_ste": "configs/lenet5_quantize_71x_ste.yaml",  # the same bits, STE retraining
    "iterative_quantize_71x": "configs/lenet5_iterative_quantize_71x.yaml",  # baseline: iterative, same bits
    "prune_quantize": "configs/lenet5_prune_quantize.yaml",
    "binary": "configs/lenet5_binary.yaml",
    "binary_long": "configs/lenet5_binary_long.yaml",  # all images, 12 + 2 epochs
    "binary_long_ste": "configs/lenet5_binary_long_ste.yaml",  # the same, STE retraining
    "structured_quantize": "configs/lenet5_structured_quantize.yaml",
}
# runs that start from the dense model
DENSE_STARTS = ("prune_quantize", "binary", "binary_long", "binary_long_ste", "structured_quantize")
ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824"}


def config_path(name: str, out_root: Path, pretrained: str | None) -> Path:
    """The experiment's config, or a copy of it starting from another dense checkpoint."""
    path = ROOT / EXPERIMENTS[name]
    if pretrained is None:
        return path
    import yaml

    spec = yaml.safe_load(path.read_text())
    if "lenet5_mnist_dense" not in spec["pretrained"]:
        return path  # starts from another run's result, not from the dense checkpoint
    spec["pretrained"] = str(Path(pretrained).resolve())
    copy = out_root / f"{name}.yaml"
    copy.parent.mkdir(parents=True, exist_ok=True)
    copy.write_text(yaml.safe_dump(spec, sort_keys=False))
    return copy


def run(name: str, out_root: Path, pretrained: str | None = None) -> None:
    out = out_root / name
    cmd = [
        sys.executable,
        "-m",
        "admmcompress.cli",
        "run",
        str(config_path(name, out_root, pretrained)),
        "--out",
        str(out),
        "--no-progress",
    ]
    if (out / "checkpoint.pt").exists():
        if (out / "model.safetensors").exists():
            print(f"{name}: finished run in {out}, skipped", flush=True)
            return
        cmd.append("--resume")
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, **ENV}, cwd=ROOT, stdout=subprocess.DEVNULL)


def pack(name: str, out_root: Path) -> None:
    out = out_root / name
    if (out / "model.safetensors").exists():
        cmd = [
            sys.executable,
            "-m",
            "admmcompress.cli",
            "export",
            "--packed",
            str(out),
            "--out",
            str(out / "model.admmpk"),
        ]
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def load(name: str, out_root: Path) -> dict | None:
    path = out_root / name / "metrics.json"
    return json.loads(path.read_text())["metrics"] if path.is_file() else None


def _x(value) -> str:
    return "inf" if value in ("inf", float("inf")) else f"{value:,.1f}x"


def layer_table(storage: dict) -> list[str]:
    lines = [
        "| layer | kept / weights | levels | bits b | best scheme | b_r | bits stored |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for layer in storage["layers"]:
        value = layer["value"]
        levels = "float32" if value["kind"] == "float32" else f"{value['levels']} ({value['kind']})"
        lines.append(
            f"| {layer['name']} | {layer['nnz']:,} / {layer['params']:,} | {levels} | "
            f"{value['code_bits']} | {layer['best']} | {layer['index_bits']} | "
            f"{layer['bits'][layer['best']]:,} |"
        )
    return lines


def summarize(out_root: Path) -> str:
    from admmcompress.executors.packed import read_manifest

    lines = []
    rows = [
        "| run | top-1 start -> after | drop vs dense | weight reduction | paper-style storage | "
        "honest storage (best per layer) | bitmask | relative | CSR | structured | "
        "packed file (weights + biases + header) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in EXPERIMENTS:
        m = load(name, out_root)
        if not m or "storage" not in m:
            continue
        s = m["storage"]
        red = s["storage_reduction"]
        packed = out_root / name / "model.admmpk"
        size = "-"
        if packed.is_file():
            manifest, _ = read_manifest(packed)
            weight_bytes = (s["weight_bits"]["best"] + 7) // 8
            size = (
                f"{packed.stat().st_size:,} B (report {weight_bytes:,} + {s['other_bits'] // 8:,} B; "
                f"header {manifest['header_bytes']} B)"
            )
        before, after = m["accuracy_before"], m["accuracy_after"]
        dense = next(
            (r["accuracy_before"] for r in map(lambda n: load(n, out_root), DENSE_STARTS) if r), before
        )
        rows.append(
            f"| {name} | {before:.2f}% -> {after:.2f}% | {after - dense:+.2f} | "
            f"{_x(s['weight_reduction'])} | {_x(s['paper_reduction'])} | **{_x(red['best'])}** | "
            f"{_x(red['bitmask'])} | {_x(red['relative'])} | {_x(red['csr'])} | {_x(red['structured'])} | "
            f"{size} |"
        )
        lines += [f"### {name} ({EXPERIMENTS[name]})", "", *layer_table(s), ""]
        stages = [st for st in m.get("stages", []) if st]
        if stages:
            lines.append(
                "Stages (accuracy before hard projection -> after -> after retraining): "
                + "; ".join(
                    f"{i}: {st.get('accuracy_before_hard_prune', 0):.2f} -> "
                    f"{st.get('accuracy_after_hard_prune', 0):.2f} -> "
                    f"{st.get('accuracy_after_retrain', 0):.2f}"
                    for i, st in enumerate(stages, 1)
                )
            )
            lines.append("")
    return "\n".join(rows + [""] + lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=sorted(EXPERIMENTS), action="append")
    parser.add_argument("--summarize", action="store_true", help="print tables from finished runs only")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench_quant"))
    parser.add_argument("--pretrained", help="dense checkpoint to start from instead of the configs' own")
    args = parser.parse_args()
    out_root = Path(args.out)
    if not args.summarize:
        for name in args.only or EXPERIMENTS:
            run(name, out_root, args.pretrained)
            pack(name, out_root)
    print(summarize(out_root))


if __name__ == "__main__":
    main()
