"""Block-sparse kernel speed: a 4096x4096 Linear and a GRU layer (hidden 1024), dense vs block-sparse.

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 python benchmarks/blocksparse_kernels.py

Weights are pruned with ``Block(compression=c, block=(16, 64))`` (block-columns of 16 rows; global
top-k, or ``--per-block`` for the balanced variant) at c in 2..20x; every weight matrix of the GRU
(``weight_ih_l0`` 3072x1024 and ``weight_hh_l0`` 3072x1024) is pruned at the same rate. Contenders,
timed round-robin in one process (BENCHMARKING.md): the dense layer (``nn.Linear`` / ``nn.GRU``), the
block-sparse executor (gather + bmm, the default), torch CSR for the Linear, and with ``--cpp`` the
compiled kernel (``executors/blocksparse_cpp.py``: the Linear product, and whole GRU sequences).
Each round runs every contender ``--calls`` times; the figures are over all rounds (``eval``,
``inference_mode``, ``--threads``: 2 by default, >= 5 warm-up calls). The GRU runs ``--steps`` steps.

Ideal speedup = dense MACs / kept MACs = c; "of ideal" = measured speedup / c. Medians and minima
are both printed: on a shared machine, preemption inflates long calls (the dense ones) the most.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from admmcompress.executors.blockmatrix import BlockSparseMatrix
from admmcompress.executors.blocksparse import BlockSparseGRU, BlockSparseLinear
from admmcompress.structures import Block

MALLOC = "MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824"


def prune(matrix: torch.Tensor, compression: float, per_block: bool) -> torch.Tensor:
    return Block(compression=compression, block=(16, 64), per_block=per_block).project(matrix)


def interleaved(
    contenders: dict[str, Callable[[], object]], rounds: int, calls: int
) -> dict[str, tuple[float, float]]:
    """(median, min) seconds per call of each contender, timed round-robin (order alternates each round).

    On a machine shared with other jobs, a long call is more often preempted than a short one, which
    inflates the dense contender's median; the minimum (the undisturbed cost) is printed beside it.
    """
    for fn in contenders.values():
        for _ in range(5):
            fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            fn = contenders[name]
            for _ in range(calls):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(v), min(v)) for name, v in times.items()}


def linear_rows(compressions, batch, rounds, calls, per_block, cpp) -> list[str]:
    torch.manual_seed(0)
    dense = nn.Linear(4096, 4096, bias=True).eval()
    x = torch.randn(batch, 4096)
    contenders: dict[str, Callable[[], object]] = {"dense": lambda: dense(x)}
    macs: dict[str, tuple[int, float]] = {"dense": (4096 * 4096, 1.0)}
    for c in compressions:
        w = prune(dense.weight.detach(), c, per_block)
        layer = nn.Linear(4096, 4096).eval()
        with torch.no_grad():
            layer.weight.copy_(w)
            layer.bias.copy_(dense.bias)
        fast = BlockSparseLinear.from_dense(layer, block_rows=16)
        csr = BlockSparseLinear(BlockSparseMatrix(w, 16, impl="csr", bias=dense.bias))
        torch.testing.assert_close(fast(x), layer(x), atol=1e-4, rtol=1e-4)
        real = 4096 * 4096 / int(torch.count_nonzero(w))
        contenders[f"block {c}x"] = lambda f=fast: f(x)
        contenders[f"csr {c}x"] = lambda f=csr: f(x)
        if cpp:
            compiled = BlockSparseLinear.from_dense(layer, block_rows=16, impl="cpp")
            torch.testing.assert_close(compiled(x), layer(x), atol=1e-4, rtol=1e-4)
            contenders[f"block+cpp {c}x"] = lambda f=compiled: f(x)
            macs[f"block+cpp {c}x"] = (fast.matrix.stored_values, real)
        macs[f"block {c}x"] = (fast.matrix.stored_values, real)
        macs[f"csr {c}x"] = (int(torch.count_nonzero(w)), real)
    with torch.inference_mode():
        med = interleaved(contenders, rounds, calls)
    return table("Linear 4096x4096", batch, med, macs)


def gru_rows(compressions, batch, steps, rounds, calls, per_block, cpp) -> list[str]:
    torch.manual_seed(0)
    dense = nn.GRU(1024, 1024).eval()
    x = torch.randn(steps, batch, 1024)
    contenders: dict[str, Callable[[], object]] = {"dense": lambda: dense(x)}
    total = 2 * 3072 * 1024
    macs: dict[str, tuple[int, float]] = {"dense": (total, 1.0)}
    for c in compressions:
        gru = nn.GRU(1024, 1024).eval()
        gru.load_state_dict(dense.state_dict())
        with torch.no_grad():
            for name in ("weight_ih_l0", "weight_hh_l0"):
                w = getattr(gru, name)
                # Gate blocks of 1024 rows: 16-row blocks never straddle them (SPEC P13).
                w.copy_(Block(compression=c, block=(16, 64), per_block=per_block, gates=3).project(w))
        fast = BlockSparseGRU.from_dense(gru, block_rows=16)
        for a, b in zip(fast(x), gru(x), strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        if cpp:
            compiled = BlockSparseGRU.from_dense(gru, block_rows=16, kernel="cpp")
            for a, b in zip(compiled(x), gru(x), strict=True):
                torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
            contenders[f"block+cpp {c}x"] = lambda f=compiled: f(x)
        kept = int(torch.count_nonzero(gru.weight_ih_l0)) + int(torch.count_nonzero(gru.weight_hh_l0))
        contenders[f"block {c}x"] = lambda f=fast: f(x)
        stored = sum(m.stored_values for m in (*fast.ih, *fast.hh))
        macs[f"block {c}x"] = (stored, total / kept)
        macs[f"block+cpp {c}x"] = (stored, total / kept)
    with torch.inference_mode():
        med = interleaved(contenders, rounds, calls)
    return table(f"GRU 1024->1024, {steps} steps", batch, med, macs)


def table(
    title: str, batch: int, med: dict[str, tuple[float, float]], macs: dict[str, tuple[int, float]]
) -> list[str]:
    (base, base_min) = med["dense"]
    lines = [
        f"\n{title}, batch {batch}",
        "| contender | compression | MACs stored | ms median | ms min | speedup (median) | speedup (min) "
        "| of ideal (min) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, (seconds, fastest) in med.items():
        stored, real = macs[name]
        speedup, speedup_min = base / seconds, base_min / fastest
        lines.append(
            f"| {name} | {real:.2f}x | {stored:,} | {seconds * 1e3:.3f} | {fastest * 1e3:.3f} "
            f"| {speedup:.2f}x "
            f"| {speedup_min:.2f}x | {speedup_min / real:.2f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compressions", type=float, nargs="+", default=[2, 3, 5, 10, 15, 20])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--steps", type=int, default=16, help="GRU sequence length")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--per-block", action="store_true", help="balanced Block(per_block=True) pruning")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=["linear", "gru"], default=None)
    parser.add_argument("--cpp", action="store_true", help="add the compiled GRU sequence kernel (builds it)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    comps = [int(c) if float(c).is_integer() else c for c in args.compressions]
    machine = f"{platform.machine()} {platform.processor()}, {os.cpu_count()} cores"
    print(f"machine: {machine}, torch {torch.__version__}, threads {args.threads}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M')}, Block(block=(16, 64), per_block={args.per_block})")
    print(f"load average before: {os.getloadavg()[0]:.2f} (other jobs share this machine)")
    for batch in args.batches:
        if args.only in (None, "linear"):
            print("\n".join(linear_rows(comps, batch, args.rounds, args.calls, args.per_block, args.cpp)))
        if args.only in (None, "gru"):
            rows = gru_rows(comps, batch, args.steps, args.rounds, args.calls, args.per_block, args.cpp)
            print("\n".join(rows))
    print(f"\nrerun: {MALLOC} python benchmarks/blocksparse_kernels.py {' '.join(sys.argv[1:])}".rstrip())


if __name__ == "__main__":
    main()
