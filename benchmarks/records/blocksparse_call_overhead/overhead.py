"""Where the time of one batch-1 block-sparse Linear call goes: the module call vs the bare compiled kernel.

    python benchmarks/records/blocksparse_call_overhead/overhead.py

Linear layers at 10x (``Block(block=(16, 64))``), the compiled kernel, one thread, the fastest of 3000 calls of
each (this ran beside training jobs; the minimum is what a call costs when it is not preempted). Columns, each
adding one layer of Python to the previous: ``ext`` (the kernel with its arguments prepared), ``ext+packed``
(the arguments looked up, as every call does), ``matrix.forward``, ``layer.forward`` and ``module`` (what a
user's ``layer(x)`` costs).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from admmcompress.executors import blocksparse_cpp
from admmcompress.executors.blocksparse import BlockSparseLinear
from admmcompress.structures import Block
from admmcompress.timing import cpu_model


def main() -> None:
    torch.set_num_threads(1)
    ext = blocksparse_cpp.load()
    print(f"# {cpu_model()}, torch {torch.__version__}, 1 thread; microseconds, fastest of 3000")
    print("| out x in | ext | ext+packed | matrix.forward | layer.forward | module | module - ext |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for out_f, in_f in [(768, 3072), (3072, 768), (2048, 2048)]:
        layer = nn.Linear(in_f, out_f).eval()
        with torch.no_grad():
            layer.weight.copy_(Block(compression=10, block=(16, 64)).project(layer.weight))
        fast = BlockSparseLinear.from_dense(layer, block_rows=16, impl="cpp").eval()
        matrix, x = fast.matrix, torch.randn(1, in_f)
        args = blocksparse_cpp.packed(matrix)
        calls = {
            "ext": lambda: ext.bsmm(x, *args, out_f),  # noqa: B023 (called within this iteration)
            "ext+packed": lambda: ext.bsmm(x, *blocksparse_cpp.packed(matrix), out_f),  # noqa: B023
            "matrix.forward": lambda: matrix.forward(x),  # noqa: B023
            "layer.forward": lambda: fast.forward(x),  # noqa: B023
            "module": lambda: fast(x),  # noqa: B023
        }
        best = dict.fromkeys(calls, float("inf"))
        with torch.inference_mode():
            for _ in range(3000):
                for name, call in calls.items():
                    start = time.perf_counter()
                    call()
                    best[name] = min(best[name], time.perf_counter() - start)
        us = {name: 1e6 * s for name, s in best.items()}
        cells = " | ".join(f"{us[n]:.1f}" for n in calls)
        print(f"| {out_f}x{in_f} | {cells} | {us['module'] - us['ext']:.1f} |")


if __name__ == "__main__":
    main()
