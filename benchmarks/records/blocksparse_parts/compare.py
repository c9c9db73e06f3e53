"""Batch-split recurrent sequences on two threads: two parts of 16 inputs, or four of 8 taken as threads finish.

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 \\
      python benchmarks/records/blocksparse_parts/compare.py --processes 3

(``ADMMCOMPRESS_KERNEL_MARCH=haswell`` in front for the AVX2 build.) One GRU / LSTM layer at 10x
(``Block(block=(16, 64))`` on both matrices), 16 steps, compiled kernel (``gru_layer`` / ``lstm_layer``), two
threads, batches 16 and 32, under two settings of the same build: ``16 x 1`` (kernel v18: split from 16 inputs per
part, one part per thread, each part's input product inside its steps) and ``8 x 2`` (from 8 inputs per part, up
to two parts per thread, taken as the threads finish; parts of 8 compute the input product before the sequence).
Round-robin in a new random order, medians of 15 rounds of 3 calls, each output checked against the dense layer
first; fresh processes, since two threads on this VM run faster in some processes than in others.
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

SETTINGS = {"16 x 1": (16, 1), "8 x 2": (8, 2)}


def one_process(rounds: int) -> list[dict]:
    from admmcompress.executors import blocksparse_cpp
    from admmcompress.executors.blocksparse_rnn import BlockSparseGRU, BlockSparseLSTM
    from admmcompress.structures import Block

    torch.set_num_threads(2)
    ext = blocksparse_cpp.load()
    rows = []
    for kind, hidden in (("lstm", 512), ("gru", 512), ("lstm", 1024)):
        torch.manual_seed(0)
        dense = (nn.GRU if kind == "gru" else nn.LSTM)(hidden, hidden).eval()
        with torch.no_grad():
            for name, weight in dense.named_parameters():
                if name.startswith("weight"):
                    weight.copy_(Block(compression=10, block=(16, 64)).project(weight))
        fast = (BlockSparseGRU if kind == "gru" else BlockSparseLSTM).from_dense(dense, block_rows=16, kernel="cpp")
        ih, hh = blocksparse_cpp.packed(fast.ih[0]), blocksparse_cpp.packed(fast.hh[0])
        for batch in (16, 32):
            x, h0 = torch.randn(16, batch, hidden), torch.zeros(batch, hidden)

            def layer(x=x, h0=h0, ih=ih, hh=hh, kind=kind):
                if kind == "gru":
                    return ext.gru_layer(x, h0, *ih, *hh, False)
                return ext.lstm_layer(x, h0, h0, *ih, *hh, False)

            def under(setting, layer=layer):
                split_rows, per_thread = SETTINGS[setting]
                before = ext.set_batch_split_rows(split_rows), ext.set_parts_per_thread(per_thread)
                try:
                    return layer()
                finally:
                    ext.set_batch_split_rows(before[0])
                    ext.set_parts_per_thread(before[1])

            calls = {"dense": lambda x=x, dense=dense: dense(x)} | {
                name: (lambda name=name, under=under: under(name)) for name in SETTINGS
            }
            with torch.inference_mode():
                expected = dense(x)[0]
                for name in SETTINGS:
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
            rows.append({"case": f"{kind} {hidden}", "batch": batch,
                         **{name: statistics.median(v) for name, v in times.items()}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_process(args.rounds)))
        return
    from admmcompress.executors import blocksparse_cpp
    from admmcompress.timing import cpu_model

    blocksparse_cpp.load()
    runs = []
    for _ in range(args.processes):
        done = subprocess.run([sys.executable, __file__, "--child", "--rounds", str(args.rounds)],
                              capture_output=True, text=True, check=True, env=os.environ.copy())
        runs.append(json.loads(done.stdout))
    print(f"# 2 threads; {cpu_model()}; -march={blocksparse_cpp.DEFAULT_MARCH}, kernel v{blocksparse_cpp.VERSION}; "
          f"{args.processes} fresh processes, medians of {args.rounds} rounds")
    print("| case | batch | dense ms | 16 x 1 ms | 8 x 2 ms | 8 x 2 speed-up | of the MAC ideal, 16 x 1 / 8 x 2 |")
    print("|---|---:|---|---|---|---|---|")
    for i, row in enumerate(runs[0]):
        cells = [[run[i][key] for run in runs] for key in ("dense", "16 x 1", "8 x 2")]
        speed = [a / b for a, b in zip(cells[1], cells[2], strict=True)]
        ideal = [f"{d / a / 10:.2f} / {d / b / 10:.2f}" for d, a, b in zip(*cells, strict=True)]
        print(f"| {row['case']} | {row['batch']} | " + " | ".join(", ".join(f"{v:.2f}" for v in c) for c in cells)
              + f" | {', '.join(f'{v:.2f}x' for v in speed)} | {', '.join(ideal)} |")


if __name__ == "__main__":
    main()
