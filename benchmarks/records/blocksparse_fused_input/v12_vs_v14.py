"""The LSTM 512 at 10x, kernel v12 (commit ae5b1cd) against the library's kernel, in one process.

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 \\
      python benchmarks/records/blocksparse_fused_input/v12_vs_v14.py --march native --threads 2 --batches 1 32

v12's source is read from git (``git show ae5b1cd:...``) and built under its own name; its layer is ``bsmm`` over
all steps, then ``lstm_sequence``, as its Python module called them; the library's is one ``lstm_layer`` call.
Dense, v12 and the library's kernel in shuffled order per round, medians of the rounds after 3 (each of 3 calls);
"of ideal" is dense / 10 / time. Run it in several fresh processes: two threads on this VM vary between processes.
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.cpp_extension import load_inline

from admmcompress.executors import blocksparse_cpp
from admmcompress.executors.blocksparse_rnn import BlockSparseLSTM
from admmcompress.structures import Block

OLD = "ae5b1cd"


def old_source() -> str:
    text = subprocess.run(["git", "show", f"{OLD}:src/admmcompress/executors/blocksparse_cpp.py"], check=True,
                          capture_output=True, text=True, cwd=Path(__file__).parent).stdout
    return text.split('SOURCE = r"""', 1)[1].split('"""', 1)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--march", default="native")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--rounds", type=int, default=60)
    args = parser.parse_args()
    flags = [f"-march={args.march}" if f == "-march=native" else f for f in blocksparse_cpp.CFLAGS]
    old = load_inline(name=f"blocksparse_{OLD}_{args.march}", cpp_sources=[old_source()], extra_cflags=flags,
                      extra_ldflags=blocksparse_cpp.LDFLAGS)
    new = blocksparse_cpp.load(march=args.march)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hidden = 512
    dense = nn.LSTM(hidden, hidden).eval()
    with torch.no_grad():
        for name, weight in dense.named_parameters():
            if name.startswith("weight"):
                weight.copy_(Block(compression=10, block=(16, 64)).project(weight))
    fast = BlockSparseLSTM.from_dense(dense, block_rows=16, kernel="cpp").eval()
    ih, hh = blocksparse_cpp.packed(fast.ih[0]), blocksparse_cpp.packed(fast.hh[0])
    for batch in args.batches:
        x, h0 = torch.randn(16, batch, hidden), torch.zeros(batch, hidden)
        calls = {
            "dense": lambda x=x: dense(x),
            "v12": lambda x=x, h0=h0: old.lstm_sequence(
                old.bsmm(x.view(-1, hidden), *ih, 4 * hidden).view(16, x.shape[1], -1), h0, h0, *hh, False),
            f"v{blocksparse_cpp.VERSION}": lambda x=x, h0=h0: new.lstm_layer(x, h0, h0, *ih, *hh, False),
        }
        times: dict[str, list[float]] = {name: [] for name in calls}
        names = list(calls)
        with torch.inference_mode():
            for r in range(args.rounds + 3):
                random.shuffle(names)
                for name in names:
                    start = time.perf_counter()
                    for _ in range(3):
                        calls[name]()
                    if r >= 3:
                        times[name].append((time.perf_counter() - start) / 3 * 1e3)
        med = {name: statistics.median(values) for name, values in times.items()}
        now = f"v{blocksparse_cpp.VERSION}"
        print(f"-march={args.march}, {args.threads} threads, batch {batch}: dense {med['dense']:.3f} ms; v12 "
              f"{med['v12']:.3f} ms ({med['dense'] / 10 / med['v12']:.2f} of ideal); {now} {med[now]:.3f} ms "
              f"({med['dense'] / 10 / med[now]:.2f}); {now} / v12 speed {med['v12'] / med[now]:.2f}x", flush=True)


if __name__ == "__main__":
    main()
