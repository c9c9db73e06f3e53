"""Hot-loop timing of the 4096->1024 Linear at 10x, batch 1, one thread: dense against the compiled kernel.

    PYTHONPATH=src python benchmarks/records/blocksparse_grid_v19/hot_loop.py LABEL   (in a worktree of each commit)
"""

import copy
import statistics
import sys
import time

import torch
from torch import nn

from admmcompress.executors.blocksparse import convert_module
from admmcompress.structures import Block

torch.set_num_threads(1)
torch.manual_seed(0)
dense = nn.Linear(4096, 1024).eval()
with torch.no_grad():
    dense.weight.copy_(Block(compression=10, block=(16, 64)).project(dense.weight))
cpp = convert_module(copy.deepcopy(dense), 16, impl="cpp", kernel="cpp", min_sparsity=0.0)
x = torch.randn(1, 4096)
res: dict[str, list[float]] = {"dense": [], "cpp": []}
with torch.inference_mode():
    torch.testing.assert_close(cpp(x), dense(x), atol=1e-4, rtol=1e-4)
    for _ in range(300):
        dense(x)
        cpp(x)
    for _ in range(40):
        for name, module in (("dense", dense), ("cpp", cpp)):
            start = time.perf_counter()
            for _ in range(50):
                module(x)
            res[name].append((time.perf_counter() - start) / 50 * 1e3)
d, c = statistics.median(res["dense"]), statistics.median(res["cpp"])
print(f"{sys.argv[1] if len(sys.argv) > 1 else 'this tree'}: dense {d:.4f} ms, cpp {c:.4f} ms, speed-up {d / c:.2f}x")
