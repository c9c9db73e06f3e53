"""Where a block-sparse LSTM/GRU layer's time goes at batch 32: input product, sequence, hidden products alone.

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 \\
      python benchmarks/records/blocksparse_grid_3/rnn_parts.py --threads 1 --hidden 512 --kind lstm

One layer at 10x (``Block(block=(16, 64))`` on both matrices), 16 steps, batch 32, compiled kernel: the dense
layer; the block-sparse layer; its input product for all steps (one product of 512 rows); the compiled sequence
alone (the hidden products fused with the gate arithmetic); the 16 hidden products alone; and 16 dense hidden
products. Medians of 20 rounds after 5, the parts of a round in a fixed order.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from admmcompress.executors import blocksparse_cpp
from admmcompress.executors.blocksparse_rnn import BlockSparseGRU, BlockSparseLSTM
from admmcompress.structures import Block


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--kind", choices=["lstm", "gru"], default="lstm")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hidden, lstm = args.hidden, args.kind == "lstm"
    rnn = (nn.LSTM if lstm else nn.GRU)(hidden, hidden).eval()
    with torch.no_grad():
        for name, weight in rnn.named_parameters():
            if name.startswith("weight"):
                weight.copy_(Block(compression=10, block=(16, 64)).project(weight))
    fast = (BlockSparseLSTM if lstm else BlockSparseGRU).from_dense(rnn, block_rows=16, kernel="cpp").eval()
    ext = blocksparse_cpp.load()
    steps, batch, gates = 16, 32, 4 if lstm else 3
    x = torch.randn(steps, batch, hidden)
    hh, ih = blocksparse_cpp.packed(fast.hh[0]), blocksparse_cpp.packed(fast.ih[0])
    gi = ext.bsmm(x.reshape(steps * batch, hidden), *ih, gates * hidden).view(steps, batch, -1).contiguous()
    h0, c0 = torch.zeros(batch, hidden), torch.zeros(batch, hidden)
    if lstm:
        def sequence():
            return ext.lstm_sequence(gi, h0, c0, *hh, False)
    else:
        def sequence():
            return ext.gru_sequence(gi, h0, *hh, False)
    parts = {
        "dense layer": lambda: rnn(x),
        "block-sparse layer (compiled)": lambda: fast(x),
        "input product, all steps": lambda: ext.bsmm(x.reshape(steps * batch, hidden), *ih, gates * hidden),
        "sequence (hidden products + gates)": sequence,
        "16 hidden products alone": lambda: [ext.bsmm(h0, *hh, gates * hidden) for _ in range(steps)],
        "16 dense hidden products": lambda: [torch.nn.functional.linear(h0, rnn.weight_hh_l0) for _ in range(steps)],
    }
    times: dict[str, list[float]] = {name: [] for name in parts}
    with torch.inference_mode():
        for r in range(25):
            for name, call in parts.items():
                start = time.perf_counter()
                call()
                if r >= 5:
                    times[name].append(1e3 * (time.perf_counter() - start))
    print(f"{args.kind} {hidden}, batch {batch}, {steps} steps, {args.threads} thread(s), "
          f"-march={blocksparse_cpp.DEFAULT_MARCH}")
    for name, values in times.items():
        print(f"- {name}: {statistics.median(values):.3f} ms")


if __name__ == "__main__":
    main()
