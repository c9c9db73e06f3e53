"""Recurrent layers at batch 32: each step's input product inside the sequence, or all steps' before it.

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 \\
      python benchmarks/records/blocksparse_fused_input/compare.py --threads 1 2 --processes 3

(``ADMMCOMPRESS_KERNEL_MARCH=haswell`` in front for the AVX2 build.) One GRU / LSTM layer at 10x
(``Block(block=(16, 64))`` on both matrices, hidden 512 and 1024, 16 steps, batch 32), compiled kernel v13:
dense; ``gru_layer`` / ``lstm_layer``, which compute each step's gate inputs right before its hidden products
(fused); and the same build's ``bsmm`` over all 512 input rows followed by ``gru_sequence`` / ``lstm_sequence``
(separate: kernel v12's layer). Round-robin in a new random order, medians of 15 rounds of 3 calls; every output
is checked against the dense layer first. Each process is fresh because two threads on this VM run faster in some
processes than in others.
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


def one_process(threads: int, rounds: int) -> list[dict]:
    from admmcompress.executors import blocksparse_cpp
    from admmcompress.executors.blocksparse_rnn import BlockSparseGRU, BlockSparseLSTM
    from admmcompress.structures import Block

    torch.set_num_threads(threads)
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
            ih, hh = blocksparse_cpp.packed(fast.ih[0]), blocksparse_cpp.packed(fast.hh[0])
            gates = 3 if kind == "gru" else 4
            x, h0 = torch.randn(16, 32, hidden), torch.zeros(32, hidden)

            def fused(x=x, h0=h0, ih=ih, hh=hh, kind=kind):
                if kind == "gru":
                    return ext.gru_layer(x, h0, *ih, *hh, False)
                return ext.lstm_layer(x, h0, h0, *ih, *hh, False)

            def separate(x=x, h0=h0, ih=ih, hh=hh, kind=kind, g=gates * hidden):
                gi = ext.bsmm(x.reshape(-1, x.shape[2]), *ih, g).view(x.shape[0], x.shape[1], g)
                if kind == "gru":
                    return ext.gru_sequence(gi, h0, *hh, False)
                return ext.lstm_sequence(gi, h0, h0, *hh, False)

            calls = {"dense": lambda x=x, dense=dense: dense(x), "fused": fused, "separate": separate}
            with torch.inference_mode():
                expected = dense(x)[0]
                for name in ("fused", "separate"):
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
            rows.append({"case": f"{kind} {hidden}", **{name: statistics.median(v) for name, v in times.items()}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_process(args.child, args.rounds)))
        return
    from admmcompress.executors import blocksparse_cpp
    from admmcompress.timing import cpu_model

    print(f"# {cpu_model()}, torch {torch.__version__}, -march={blocksparse_cpp.DEFAULT_MARCH}, 16 steps, batch 32, "
          f"10x; load average {os.getloadavg()[0]:.2f}")
    print("| threads | process | case | dense ms | fused ms | separate ms | fused / separate speed | "
          "fused: of the MAC ideal | separate: of the MAC ideal |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for threads in args.threads:
        for proc in range(args.processes):
            out = subprocess.run([sys.executable, __file__, "--child", str(threads), "--rounds", str(args.rounds)],
                                 capture_output=True, text=True, check=True).stdout
            for row in json.loads(out.strip().splitlines()[-1]):
                d, f, s = row["dense"], row["fused"], row["separate"]
                print(f"| {threads} | {proc} | {row['case']} | {d:.3f} | {f:.3f} | {s:.3f} | {s / f:.2f}x | "
                      f"{d / 10 / f:.2f} | {d / 10 / s:.2f} |", flush=True)


if __name__ == "__main__":
    main()
