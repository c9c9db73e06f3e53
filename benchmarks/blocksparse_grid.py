"""Block-sparse kernels over the issue-19 grid: cache sizes, compression, batch, threads, layer types.

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 python benchmarks/blocksparse_grid.py
    python benchmarks/blocksparse_grid.py --quick        # smoke: one small case, seconds
    python benchmarks/blocksparse_grid.py --merge a.json b.json c.json   # medians of repeated runs

Cases: square Linear layers whose fp32 weight fits in half the L3 cache and one of at least 4x the L3
size (read from sysfs / lscpu), the transformer MLP projections 768<->3072 and 1024<->4096, and one-layer
GRU/LSTM (hidden 512 and 1024, input = hidden, ``--steps`` steps). Weights are pruned with
``Block(compression=c, block=(r, --block-cols))`` (GRU/LSTM: every gate matrix, ``gates`` set) at each
``--compressions``; every contender is checked against the masked dense layer (1e-4) before timing.

Contenders, timed round-robin in one process (``admmcompress.timing.time_interleaved``, medians; each
round in a new random order, so that no contender always follows the cache-evicting dense one):
``dense`` (the torch layer), ``torch`` (block-sparse gather + bmm), ``cpp`` (the compiled kernel,
OpenMP), ``bsr`` (torch sparse BSR on the same weight pruned in whole ``r x r`` blocks at the same
compression: what torch offers for block sparsity) and ``chosen`` (``to_blocksparse(choose="measured")``:
the per-shape choice, from a latency table measured in a separate pass, cached in ``--table-dir``).
With ``--float16``, also ``cpp16``: the compiled kernel on the same weights stored in float16
(``values_dtype=torch.float16``, half the bytes; checked against the masked layer with its weights rounded to
float16), reported beside the float32 kernel, not in place of it.

Columns: speedup = dense ms / contender ms; "of ideal" = speedup / the real compression (dense MACs /
kept MACs); "vs bsr" = bsr ms / cpp ms. The summary checks the issue's targets: >= 0.8 of the ideal at
batch 1 and 10x (in and out of cache, 1 and 2 threads), >= 0.5 at batch 32, the chosen implementation
never slower than dense, and the share of points where the choice fell back to dense.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from admmcompress.cpu_caches import cache_sizes, l3_bytes
from admmcompress.executors import blocksparse_cpp
from admmcompress.executors.blocksparse import choice_report, convert_module, to_blocksparse
from admmcompress.executors.blocksparse_choice import TABLE
from admmcompress.structures import Block
from admmcompress.timing import LatencyCache, cpu_model, time_interleaved

MALLOC = "MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824"


def square_sides(l3: int) -> tuple[int, int]:
    """Sides (multiples of 256) of a square fp32 weight within half of L3, and of one >= 4x L3."""
    inside = max(256, int((l3 / 2 / 4) ** 0.5) // 256 * 256)
    outside = 256
    while outside * outside * 4 < 4 * l3:
        outside += 256
    return inside, outside


@dataclass
class Case:
    """One layer shape: ``kind`` linear / gru / lstm; ``out`` x ``inp`` (linear) or ``hidden`` (rnn)."""

    name: str
    kind: str
    inp: int
    out: int
    cache: str = ""  # where the dense weights fit: "in L3", "> L3" or ">= 4x L3"

    def dense(self) -> nn.Module:
        if self.kind == "linear":
            return nn.Linear(self.inp, self.out).eval()
        return (nn.GRU if self.kind == "gru" else nn.LSTM)(self.inp, self.out).eval()

    def macs(self) -> int:
        """Multiply-adds of one dense call per input row (and step)."""
        if self.kind == "linear":
            return self.inp * self.out
        gates = 3 if self.kind == "gru" else 4
        return gates * self.out * (self.inp + self.out)

    def example(self, batch: int, steps: int) -> torch.Tensor:
        return torch.randn(batch, self.inp) if self.kind == "linear" else torch.randn(steps, batch, self.inp)


@dataclass
class Point:
    case: str
    cache: str
    compression: float
    real: float
    batch: int
    threads: int
    ms: dict[str, float] = field(default_factory=dict)
    chosen: str = ""

    def speedup(self, name: str) -> float | None:
        return self.ms["dense"] / self.ms[name] if name in self.ms else None


def pruned(dense: nn.Module, case: Case, compression: float, block: tuple[int, int]) -> nn.Module:
    """A copy of ``dense`` with every weight matrix block-pruned to ``compression``."""
    module = copy.deepcopy(dense)
    gates = {"linear": 1, "gru": 3, "lstm": 4}[case.kind]
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.startswith("weight"):
                param.copy_(Block(compression=compression, block=block, gates=gates).project(param))
    return module


def nonzero_share(module: nn.Module) -> float:
    weights = [p for n, p in module.named_parameters() if n.startswith("weight")]
    return sum(int(torch.count_nonzero(w)) for w in weights) / sum(w.numel() for w in weights)


def close(a, b) -> None:
    if isinstance(a, tuple):
        for x, y in zip(a, b, strict=True):
            close(x, y)
    else:
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def half_rounded(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with its weight matrices rounded to float16 and back (biases as they are): what the
    kernel computes from float16 weights."""
    rounded = copy.deepcopy(module)
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if "weight" in name:
                p.copy_(p.half().float())
    return rounded


def contenders(case: Case, dense: nn.Module, c: float, args, table) -> tuple[dict[str, nn.Module], float, dict]:
    """``{name: module}`` for one compression, checked against the masked dense layer; the real compression;
    and the per-shape choice (``{batch: implementation}``)."""
    r = args.block_rows
    masked = pruned(dense, case, c, (r, args.block_cols))
    squares = pruned(dense, case, c, (r, r))  # whole r x r blocks: the pattern BSR can skip
    found = {"dense": dense}
    found["torch"] = convert_module(masked, r, impl="gather", kernel="torch", min_sparsity=0.0)
    if blocksparse_cpp.available():
        found["cpp"] = convert_module(masked, r, impl="cpp", kernel="cpp", min_sparsity=0.0)
    if blocksparse_cpp.available() and args.float16:
        found["cpp16"] = convert_module(
            masked, r, impl="cpp", kernel="cpp", min_sparsity=0.0, values_dtype=torch.float16
        )
    found["bsr"] = convert_module(squares, r, impl="bsr", kernel="torch", min_sparsity=0.0)
    holder = nn.ModuleDict({"m": copy.deepcopy(masked)})
    to_blocksparse(
        holder, r, layers=["m"], min_sparsity=0.0, choose="measured", batches=tuple(args.batches), table=table,
        steps=args.steps,
    )
    found["chosen"] = holder["m"]
    x = case.example(3, min(args.steps, 4))
    references = {"bsr": squares, "cpp16": half_rounded(masked)}
    with torch.inference_mode():
        for name, module in found.items():
            if name != "dense":
                close(module(x), references.get(name, masked)(x))
    return found, 1.0 / nonzero_share(masked), choice_report(holder).layers["m"]


def shuffled(calls: dict, rounds: int, warmup: int, seed: int = 0) -> dict[str, float]:
    """Medians over ``rounds`` rounds, each calling every contender once in a fresh random order: what runs
    just before a contender (dense evicts the caches; MKL's BSR leaves other state) must not bias it."""
    rng = random.Random(seed)
    names = list(calls)
    time_interleaved(calls, 1, warmup)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(rounds):
        order = rng.sample(names, len(names))
        for name, ms in time_interleaved({n: calls[n] for n in order}, 1, 0).items():
            samples[name].append(ms)
    return {n: statistics.median(samples[n]) for n in names}


def run_case(case: Case, args, threads: int, table) -> list[Point]:
    torch.manual_seed(0)
    dense = case.dense()
    points = []
    for c in args.compressions:
        found, real, choice = contenders(case, dense, c, args, table)
        for batch in args.batches:
            x = case.example(batch, args.steps)
            with torch.inference_mode():
                calls = {n: (lambda m=m, x=x: m(x)) for n, m in found.items()}
                ms = shuffled(calls, args.rounds, args.warmup)
            point = Point(case.name, case.cache, c, real, batch, threads, ms, choice[batch])
            points.append(point)
            print(row(point), flush=True)
        del found
    return points


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


HEADER = (
    "| case | cache | c (real) | batch | thr | dense ms | torch | cpp | bsr | chosen | cpp of ideal | "
    "cpp vs bsr | cpp16 | cpp16 of ideal |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"
)


def row(p: Point) -> str:
    cpp = p.speedup("cpp")
    vs_bsr = p.ms["bsr"] / p.ms["cpp"] if "cpp" in p.ms else None
    half = p.speedup("cpp16")
    return (
        f"| {p.case} | {p.cache} | {p.compression:g}x ({p.real:.2f}) | {p.batch} | {p.threads} | "
        f"{p.ms['dense']:.3f} | {fmt(p.speedup('torch'))}x | {fmt(cpp)}x | {fmt(p.speedup('bsr'))}x | "
        f"{fmt(p.speedup('chosen'))}x ({p.chosen}) | {fmt(None if cpp is None else cpp / p.real)} | {fmt(vs_bsr)}x | "
        f"{fmt(half)}x | {fmt(None if half is None else half / p.real)} |"
    )


def summary(points: list[Point]) -> list[str]:
    lines = ["", "Targets (issue 19):"]
    for kernel in ("cpp", "cpp16"):
        for batch, target in ((1, 0.8), (32, 0.5)):
            at = [p for p in points if p.batch == batch and p.compression == 10 and kernel in p.ms]
            for p in at:
                share = p.speedup(kernel) / p.real
                lines.append(
                    f"- batch {batch}, 10x, {p.case} ({p.cache}), {p.threads} thr: {kernel} {share:.2f} of ideal "
                    f"({'meets' if share >= target else 'below'} {target})"
                )
        met = [p.speedup(kernel) / p.real >= (0.8 if p.batch == 1 else 0.5) for p in points
               if p.batch in (1, 32) and p.compression == 10 and kernel in p.ms]
        if met:
            lines.append(f"- {kernel}: targets met at {sum(met)} of {len(met)} points")
    slower = [p for p in points if p.speedup("chosen") < 1.0]
    lines.append(
        f"- chosen slower than dense at {len(slower)} of {len(points)} points"
        + (": " + ", ".join(f"{p.case} {p.compression:g}x b{p.batch} t{p.threads} "
                            f"({p.speedup('chosen'):.2f}x)" for p in slower) if slower else "")
    )
    dense_share = sum(p.chosen == "dense" for p in points) / max(1, len(points))
    lines.append(f"- the choice fell back to dense at {dense_share:.0%} of the points")
    return lines


def merged(paths: list[str]) -> tuple[list[Point], list[str]]:
    """Points of several ``--json`` runs, each contender's milliseconds the median over the runs; and per target
    point (10x, batch 1 and 32) the compiled kernel's share of the ideal in every run, so the spread shows."""
    runs = [[Point(**p) for p in json.loads(Path(path).read_text())] for path in paths]
    by_key: dict[tuple, list[Point]] = {}
    for run in runs:
        for p in run:
            by_key.setdefault((p.case, p.compression, p.batch, p.threads), []).append(p)
    points, spread = [], []
    for (case, c, batch, threads), found in by_key.items():
        ms = {n: statistics.median(p.ms[n] for p in found if n in p.ms) for n in found[0].ms}
        chosen = statistics.mode(p.chosen for p in found)
        points.append(Point(case, found[0].cache, c, found[0].real, batch, threads, ms, chosen))
        for kernel in ("cpp", "cpp16"):
            if c == 10 and batch in (1, 32) and kernel in ms:
                shares = ", ".join(f"{p.speedup(kernel) / p.real:.2f}" for p in found if kernel in p.ms)
                spread.append(f"- {case}, batch {batch}, {threads} thr: {kernel} of ideal per run {shares}")
    return points, spread


def cases(args, l3: int) -> list[Case]:
    inside, outside = square_sides(l3)
    chosen = [
        Case(f"linear {inside}x{inside}", "linear", inside, inside),
        Case(f"linear {outside}x{outside}", "linear", outside, outside),
        Case("mlp 768->3072", "linear", 768, 3072),
        Case("mlp 3072->768", "linear", 3072, 768),
        Case("mlp 1024->4096", "linear", 1024, 4096),
        Case("mlp 4096->1024", "linear", 4096, 1024),
    ]
    chosen += [Case(f"{kind} {h}", kind, h, h) for kind in ("gru", "lstm") for h in (512, 1024)]
    if args.quick:
        chosen = [Case("linear 512x512", "linear", 512, 512), Case("gru 128", "gru", 128, 128)]
    for case in chosen:  # where the dense fp32 weights live between calls
        size = 4 * case.macs()
        case.cache = "in L3" if size <= l3 else (">= 4x L3" if size >= 4 * l3 else "> L3")
    return [c for c in chosen if not args.only or any(word in c.name for word in args.only)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny cases, 10x, batches 1 and 8, 1 thread")
    parser.add_argument("--compressions", type=float, nargs="+", default=[2, 3, 5, 10, 15, 20])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=16, help="GRU/LSTM sequence length")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--block-rows", type=int, default=16)
    parser.add_argument("--block-cols", type=int, default=64)
    parser.add_argument("--float16", action="store_true",
                        help="also time the compiled kernel on float16 weights (contender cpp16)")
    parser.add_argument("--only", nargs="+", help="cases whose name contains one of these words")
    parser.add_argument("--table-dir", default=None, help="latency table folder for the choice (default: fresh)")
    parser.add_argument("--json", default=None, help="also write every point here")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="no timing: the table and targets from the per-point medians of these --json runs")
    args = parser.parse_args()
    if args.merge:
        points, spread = merged(args.merge)
        print(f"{len(args.merge)} runs merged (per-point medians): {', '.join(args.merge)}\n\n{HEADER}")
        print("\n".join(row(p) for p in points))
        print("\n".join(summary(points)) + "\n\nPer run:\n" + "\n".join(spread))
        return
    if args.quick:
        args.compressions, args.batches, args.threads = [10.0], [1, 8], [1]
        args.steps, args.rounds, args.warmup = 4, 3, 1
    args.compressions = [int(c) if float(c).is_integer() else c for c in args.compressions]
    l3 = l3_bytes()
    folder = args.table_dir or tempfile.mkdtemp(prefix="blocksparse-choice-")
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}; caches (per core / shared): "
          f"{cache_sizes()}; L3 used for the case sizes: {l3 / (1 << 20):.0f} MiB")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M')}, load average {os.getloadavg()[0]:.2f}; "
          f"compiled kernel: {'yes' if blocksparse_cpp.available() else 'no (torch path only)'}, "
          f"-march={os.environ.get(blocksparse_cpp.MARCH_ENV) or 'native'} (${blocksparse_cpp.MARCH_ENV}), "
          f"MKL_ENABLE_INSTRUCTIONS={os.environ.get('MKL_ENABLE_INSTRUCTIONS', 'unset')}")
    print(f"Block(block=({args.block_rows}, {args.block_cols})), {args.steps} steps, choice table in {folder}")
    points: list[Point] = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        table = LatencyCache(TABLE, folder=folder)  # per thread count (the cache's machine key has it)
        print("\n" + HEADER)
        for case in cases(args, l3):
            points += run_case(case, args, threads, table)
    print("\n".join(summary(points)))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(p) for p in points], indent=1))
    print(f"\nrerun: {MALLOC} python benchmarks/blocksparse_grid.py {shlex.join(sys.argv[1:])}".rstrip())


if __name__ == "__main__":
    main()
