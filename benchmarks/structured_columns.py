"""Column (shape) pruning executor vs the dense convolution at 2x / 4x / 8x column sparsity.

    python benchmarks/structured_columns.py

Per layer: the four 3x3 conv shapes of ResNet-18 (CIFAR) with random column pruning (whole GEMM
columns = input channel x kernel position, channels not emptied), dense ``Conv2d`` holding the zeros vs
``ColumnConv2d`` (im2col of the kept columns only + one matmul), batch 1 and 64, interleaved medians.
Whole model: VGG-16-BN with every 3x3 conv but the first column-pruned, dense vs column executors on
every conv ("on") vs executors only where the layer measured faster ("auto", what ``compact`` does).
Malloc thresholds as in BENCHMARKING.md (the script re-executes itself with them), 2 threads.
"""

from __future__ import annotations

import argparse
import copy
import datetime

import torch
from structured_common import command_line, ensure_malloc_env, interleaved_ms, machine
from torch import nn

from admmcompress.executors.column import ColumnConv2d, apply_column_executors
from admmcompress.finalize import hard_prune
from admmcompress.models import create_model
from admmcompress.plan import Plan, Rule
from admmcompress.structures import Column

SHAPES = [(64, 32), (128, 16), (256, 8), (512, 4)]  # (channels, feature map side) of ResNet-18 CIFAR
RATES = {2: 0.5, 4: 0.75, 8: 0.875}


def pruned_conv(channels: int, sparsity: float, seed: int = 0) -> nn.Conv2d:
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False).eval()
    columns = channels * 9
    keep = torch.zeros(columns, dtype=torch.bool)
    keep[torch.randperm(columns, generator=g)[: round(columns * (1 - sparsity))]] = True
    with torch.no_grad():
        conv.weight.mul_(keep.view(1, channels, 3, 3))
    return conv


def per_layer(batches, rounds) -> list[str]:
    rows = [
        "| layer (C x HxW) | column sparsity | batch | dense ms | column executor ms | speedup |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for channels, side in SHAPES:
        for factor, sparsity in RATES.items():
            conv = pruned_conv(channels, sparsity)
            fast = ColumnConv2d.from_conv(conv).eval()
            for batch in batches:
                x = torch.randn(batch, channels, side, side)
                ms = interleaved_ms(
                    {"dense": lambda x=x, c=conv: c(x), "column": lambda x=x, f=fast: f(x)}, rounds
                )
                rows.append(
                    f"| {channels} x {side}x{side} | {sparsity:.3f} ({factor}x) | {batch} | "
                    f"{ms['dense']:.3f} | {ms['column']:.3f} | {ms['dense'] / ms['column']:.2f}x |"
                )
                print(rows[-1], flush=True)
    return rows


def whole_model(batches, rounds) -> list[str]:
    rows = [
        "| VGG-16 column sparsity | batch | dense ms | executors on ms | auto ms | auto: layers on column | "
        "speedup on | speedup auto |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for factor, sparsity in RATES.items():
        torch.manual_seed(0)
        model = create_model("vgg16_cifar").eval()
        convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][1:]
        hard_prune(model, Plan([Rule(Column(sparsity=sparsity), match=n) for n in convs]).resolve(model))
        for batch in batches:
            x = torch.randn(batch, 3, 32, 32)
            on, auto = copy.deepcopy(model), copy.deepcopy(model)
            with torch.inference_mode():
                apply_column_executors(on, x, mode="on")
                decisions = apply_column_executors(auto, x, mode="auto")
            used = sum(d["executor"] == "column" for d in decisions.values())
            ms = interleaved_ms(
                {
                    "dense": lambda x=x, m=model: m(x),
                    "on": lambda x=x, m=on: m(x),
                    "auto": lambda x=x, m=auto: m(x),
                },
                rounds,
            )
            rows.append(
                f"| {sparsity:.3f} ({factor}x) | {batch} | {ms['dense']:.2f} | {ms['on']:.2f} | "
                f"{ms['auto']:.2f} | {used}/{len(decisions)} | {ms['dense'] / ms['on']:.2f}x | "
                f"{ms['dense'] / ms['auto']:.2f}x |"
            )
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--threads", type=int, default=2, help="BENCHMARKING.md: 2 (the core count)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--skip-model", action="store_true")
    args = parser.parse_args()
    ensure_malloc_env()
    torch.set_num_threads(args.threads)
    print(f"# {datetime.date.today()} | {machine()}\n# {command_line()}\n", flush=True)
    rows = per_layer(args.batches, args.rounds)
    if not args.skip_model:
        rows += [""] + whole_model(args.batches, max(5, args.rounds // 2))
    print("\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
