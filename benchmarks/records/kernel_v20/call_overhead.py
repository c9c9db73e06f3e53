"""What the Python layers around the compiled kernel cost at batch 1: a 64x64 layer at 10x (the kernel's own work
under 2 us), one thread, each call timed by ``timeit`` (best of 3 x 20,000 calls, twice), beside ``nn.Linear``.

    python benchmarks/records/kernel_v20/call_overhead.py
"""

from __future__ import annotations

import timeit

import torch
from torch import nn
from torch.nn import functional as F

from admmcompress.executors import blocksparse_cpp as bc
from admmcompress.executors.blockmatrix import kernel_may_take
from admmcompress.executors.blocksparse import convert_module
from admmcompress.structures import Block


def main() -> None:
    torch.set_num_threads(1)
    dense = nn.Linear(64, 64).eval()
    with torch.no_grad():
        dense.weight.copy_(Block(compression=10, block=(16, 64), gates=1).project(dense.weight))
    layer = convert_module(dense, 16, impl="cpp", kernel="cpp", min_sparsity=0.0)
    matrix, ext, x = layer.matrix, bc.load(), torch.randn(1, 64)
    args = bc.packed(matrix)
    calls = {
        "nn.Linear(x)": lambda: dense(x),
        "F.linear": lambda: F.linear(x, dense.weight, dense.bias),
        "block-sparse module(x)": lambda: layer(x),
        "module.forward": lambda: layer.forward(x),
        "matrix.forward": lambda: matrix.forward(x),
        "ext.bsmm(x, *packed(matrix))": lambda: ext.bsmm(x, *bc.packed(matrix), 64),
        "ext.bsmm(x, *args)": lambda: ext.bsmm(x, *args, 64),
        "packed(matrix)": lambda: bc.packed(matrix),
        "kernel_may_take": lambda: kernel_may_take(x),
    }
    n = 20000
    with torch.inference_mode():
        for _ in range(2):
            print({k: round(min(timeit.repeat(f, number=n, repeat=3)) / n * 1e6, 2) for k, f in calls.items()})


if __name__ == "__main__":
    main()
