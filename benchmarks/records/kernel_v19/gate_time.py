"""Kernel v19 against v18: compiled LSTM/GRU 512 layers at 10x, 16 steps, batch 1 and 32 (2026-12-06, fifth stop).

    git worktree add /tmp/v18 7309e4a    # v18
    for i in 1 2 3; do for d in /tmp/v18 .; do (cd $d && PYTHONPATH=$d/src MALLOC_MMAP_THRESHOLD_=33554432 \\
      python $OLDPWD/benchmarks/records/kernel_v19/gate_time.py 1); done; done

Prints the source tree and the median ms of 200 calls (after 20 warm-up calls) per layer and batch.
"""

import statistics
import sys
import time

import torch
from torch import nn

import admmcompress
from admmcompress.executors.blocksparse import BlockSparseGRU, BlockSparseLSTM
from admmcompress.finalize import hard_prune
from admmcompress.plan import Plan
from admmcompress.structures import Block

torch.manual_seed(0)
torch.set_num_threads(int(sys.argv[1]))
res = []
for cls, fast_cls in ((nn.LSTM, BlockSparseLSTM), (nn.GRU, BlockSparseGRU)):
    w = nn.ModuleDict({"m": cls(512, 512)}).eval()
    hard_prune(w, Plan({"m": Block(compression=10, block=(16, 1))}).resolve(w))
    fast = fast_cls.from_dense(w["m"], block_rows=16, kernel="cpp")
    for n in (1, 32):
        x = torch.randn(16, n, 512)
        with torch.inference_mode():
            for _ in range(20):
                fast(x)
            ts = []
            for _ in range(200):
                t = time.perf_counter()
                fast(x)
                ts.append(time.perf_counter() - t)
        res.append(f"{cls.__name__}{n}:{statistics.median(ts) * 1e3:.3f}")
print(admmcompress.__file__, " ".join(res))
