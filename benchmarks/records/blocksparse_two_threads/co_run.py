"""Why two threads do not halve a batch-32 LSTM 512 sequence: each half alone, both halves at once, two threads.

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 \\
      python benchmarks/records/blocksparse_two_threads/co_run.py --repeats 3

(``ADMMCOMPRESS_KERNEL_MARCH=haswell`` in front for the AVX2 build.) One LSTM (or GRU) layer at 10x
(``Block(block=(16, 64))`` on both matrices), 16 steps, compiled kernel (``lstm_layer``), timed four ways:

- ``half alone``: batch 16 on one thread, pinned to CPU 0, nothing else running (what each thread of the batch
  split has to do);
- ``halves together``: two such processes at once, pinned to CPUs 0 and 1 (the batch split without OpenMP: what the
  two cores' shared L3 and memory cost each other);
- ``whole, 1 thread`` and ``whole, 2 threads``: batch 32 in one process (the library's call).

The dense layer (torch's LSTM) is timed the same ways beside it. Medians of ``--seconds`` of calls after a warm-up;
each way ``--repeats`` times in fresh processes, in turn. Outputs are checked against the dense layer first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from torch import nn


def build(kind: str, hidden: int, batch: int):
    """(dense, compiled) callables on one input, the compiled one checked against dense."""
    from admmcompress.executors import blocksparse_cpp
    from admmcompress.executors.blocksparse_rnn import BlockSparseGRU, BlockSparseLSTM
    from admmcompress.structures import Block

    ext = blocksparse_cpp.load()
    torch.manual_seed(0)
    dense = (nn.GRU if kind == "gru" else nn.LSTM)(hidden, hidden).eval()
    with torch.no_grad():
        for name, weight in dense.named_parameters():
            if name.startswith("weight"):
                weight.copy_(Block(compression=10, block=(16, 64)).project(weight))
    fast = (BlockSparseGRU if kind == "gru" else BlockSparseLSTM).from_dense(dense, block_rows=16, kernel="cpp")
    ih, hh = blocksparse_cpp.packed(fast.ih[0]), blocksparse_cpp.packed(fast.hh[0])
    x, h0 = torch.randn(16, batch, hidden), torch.zeros(batch, hidden)

    def compiled():
        if kind == "gru":
            return ext.gru_layer(x, h0, *ih, *hh, False)
        return ext.lstm_layer(x, h0, h0, *ih, *hh, False)

    with torch.inference_mode():
        torch.testing.assert_close(compiled()[0], dense(x)[0], atol=1e-4, rtol=1e-4)
    return (lambda: dense(x)), compiled


def timed(call, seconds: float, start_at: float) -> float:
    """Median ms per call over ``seconds`` of calls from wall-clock time ``start_at`` (after a warm-up)."""
    with torch.inference_mode():
        for _ in range(5):
            call()
        time.sleep(max(0.0, start_at - time.time()))
        times, end = [], time.time() + seconds
        while time.time() < end:
            t0 = time.perf_counter()
            call()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def child(args) -> None:
    torch.set_num_threads(args.threads)
    dense, compiled = build(args.kind, args.hidden, args.batch)
    which = {"dense": dense, "cpp": compiled}[args.which]
    print(json.dumps(timed(which, args.seconds, args.start_at)))


def spawn(which: str, batch: int, threads: int, cpus: str, args, start_at: float) -> subprocess.Popen:
    command = ["taskset", "-c", cpus, sys.executable, __file__, "--child", "--which", which, "--batch", str(batch),
               "--threads", str(threads), "--kind", args.kind, "--hidden", str(args.hidden),
               "--seconds", str(args.seconds), "--start-at", str(start_at)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=os.environ.copy())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=("lstm", "gru"), default="lstm")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--settle", type=float, default=25.0, help="seconds for the children to start and build")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--which", default="cpp", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=32, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    from admmcompress.executors import blocksparse_cpp
    from admmcompress.timing import cpu_model

    blocksparse_cpp.load()  # built once here, not in every child
    ways = {  # name: [(batch, threads, cpus), ...] run at once
        "half alone": [(16, 1, "0")],
        "halves together": [(16, 1, "0"), (16, 1, "1")],
        "whole, 1 thread": [(32, 1, "0")],
        "whole, 2 threads": [(32, 2, "0,1")],
    }
    results: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeats):
        for which in ("cpp", "dense"):
            for name, procs in ways.items():
                start_at = time.time() + args.settle  # once every child has loaded torch and built its layer
                children = [spawn(which, b, t, c, args, start_at) for b, t, c in procs]
                ms = [json.loads(p.communicate()[0]) for p in children]
                results.setdefault((which, name), []).append(max(ms))  # together: the slower half
    print(f"# {args.kind} {args.hidden}, 10x, 16 steps; {cpu_model()}; -march={blocksparse_cpp.DEFAULT_MARCH}, "
          f"kernel v{blocksparse_cpp.VERSION}; {args.repeats} fresh process sets, medians of {args.seconds:g} s")
    print("| way | compiled ms | dense ms | of the MAC ideal (dense / compiled / 10, nominal) |")
    print("|---|---|---|---|")
    for name in ways:
        cpp, dense = results[("cpp", name)], results[("dense", name)]
        ideal = [d / c / 10 for d, c in zip(dense, cpp, strict=True)]
        print(f"| {name} | {', '.join(f'{v:.2f}' for v in cpp)} | {', '.join(f'{v:.2f}' for v in dense)} | "
              f"{', '.join(f'{v:.2f}' for v in ideal)} |")


if __name__ == "__main__":
    main()
