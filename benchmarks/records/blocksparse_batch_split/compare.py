"""Recurrent layers on two threads: the batch split over the threads, or the hidden units (one process per row).

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 \\
      python benchmarks/records/blocksparse_batch_split/compare.py --processes 4

One GRU / LSTM layer at 10x (``Block(block=(16, 64))`` on both matrices, hidden 512 and 1024, 16 steps) with the
compiled kernel, at batch 32 and 64 on 2 threads: dense, the block-sparse layer splitting its batch over the
threads (``set_batch_split_rows(16)``: each thread runs the whole sequence for its inputs, with its own state)
and the same layer splitting the hidden units (a barrier per step; the split switched off). Round-robin in a new
random order, medians of 15 rounds of 3 calls; every output is checked against the dense layer first. Each
process is fresh because two threads on this VM run faster in some processes than in others.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

import torch
from torch import nn


def one_process(rounds: int) -> list[dict]:
    from admmcompress.executors import blocksparse_cpp
    from admmcompress.executors.blocksparse_rnn import BlockSparseGRU, BlockSparseLSTM
    from admmcompress.structures import Block

    torch.set_num_threads(2)
    ext = blocksparse_cpp.load()
    rows = []
    for kind in ("gru", "lstm"):
        for hidden in (512, 1024):
            torch.manual_seed(0)
            dense = (nn.GRU if kind == "gru" else nn.LSTM)(hidden, hidden).eval()
            with torch.no_grad():
                for name, weight in dense.named_parameters():
                    if name.startswith("weight"):
                        weight.copy_(Block(compression=10, block=(16, 64)).project(weight))
            cls = BlockSparseGRU if kind == "gru" else BlockSparseLSTM
            fast = cls.from_dense(dense, block_rows=16, kernel="cpp").eval()
            for batch in (32, 64):
                x = torch.randn(16, batch, hidden)

                def run(split_rows: int, x=x, fast=fast):
                    ext.set_batch_split_rows(split_rows)
                    return fast(x)

                calls = {"dense": lambda x=x, dense=dense: dense(x), "batch split": lambda: run(16),
                         "hidden split": lambda: run(10**9)}
                with torch.inference_mode():
                    expected = dense(x)[0]
                    for name in ("batch split", "hidden split"):
                        torch.testing.assert_close(calls[name]()[0], expected, atol=1e-4, rtol=1e-4)
                    times: dict[str, list[float]] = {name: [] for name in calls}
                    names = list(calls)
                    for r in range(rounds + 3):
                        random.shuffle(names)
                        for name in names:
                            start = time.perf_counter()
                            for _ in range(3):
                                calls[name]()
                            if r >= 3:
                                times[name].append((time.perf_counter() - start) / 3 * 1e3)
                ext.set_batch_split_rows(16)
                rows.append({"case": f"{kind} {hidden}", "batch": batch,
                             **{name: statistics.median(v) for name, v in times.items()}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_process(args.rounds)))
        return
    from admmcompress.timing import cpu_model

    print(f"# {cpu_model()}, torch {torch.__version__}, 2 threads, 16 steps, 10x; load average "
          f"{os.getloadavg()[0]:.2f}")
    print("| process | case | batch | dense ms | batch split ms | hidden split ms | batch / hidden split speed | "
          "speed-up over dense (batch split) |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for proc in range(args.processes):
        out = subprocess.run([sys.executable, __file__, "--child", "--rounds", str(args.rounds)],
                             capture_output=True, text=True, check=True).stdout
        for row in json.loads(out.strip().splitlines()[-1]):
            d, b, h = row["dense"], row["batch split"], row["hidden split"]
            print(f"| {proc} | {row['case']} | {row['batch']} | {d:.3f} | {b:.3f} | {h:.3f} | {h / b:.2f}x | "
                  f"{d / b:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
