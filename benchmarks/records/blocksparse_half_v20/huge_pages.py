"""Weights on transparent huge pages (madvise) vs plain memory, for dense and the v19 kernel, one thread, batch 1.

    python benchmarks/records/blocksparse_half_v20/huge_pages.py 100
"""

from __future__ import annotations

import mmap
import random
import sys

import torch
from common_timing import median_us, paired, pruned_pair, timed

from admmcompress.executors import blocksparse_cpp as bc

HUGE_PAGE = 2 << 20
_MAPPINGS: list[mmap.mmap] = []  # kept alive: the tensors below view them


def on_huge_pages(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of ``tensor`` in an anonymous mapping aligned to 2 MiB and advised MADV_HUGEPAGE."""
    nbytes = tensor.numel() * tensor.element_size()
    size = (nbytes + 2 * HUGE_PAGE) // HUGE_PAGE * HUGE_PAGE
    mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mapping.madvise(mmap.MADV_HUGEPAGE, 0, size)
    _MAPPINGS.append(mapping)
    raw = torch.frombuffer(mapping, dtype=torch.uint8)
    start = (-raw.data_ptr()) % HUGE_PAGE
    copy = raw[start:start + nbytes].view(tensor.dtype).view(tensor.shape)
    copy.copy_(tensor)
    return copy


def main() -> None:
    rounds = int(sys.argv[1])
    torch.set_num_threads(1)
    ext = bc.load()
    rng = random.Random(0)
    for inp, out in [(3072, 768), (768, 3072), (2048, 2048), (5888, 5888)]:
        for c in (10, 20):
            dense, masked, args = pruned_pair(inp, out, c)
            x = torch.randn(1, inp)
            plain = tuple(a.clone() for a in args)
            huge = tuple(on_huge_pages(a) if a.nbytes > 65536 else a.clone() for a in args)
            torch.testing.assert_close(ext.bsmm(x, *huge, out), masked(x), atol=1e-4, rtol=1e-4)
            weight = on_huge_pages(dense.weight.detach())
            calls = {
                "dense": lambda d=dense, x=x: d(x),
                "denseHP": lambda w=weight, b=dense.bias, x=x: torch.nn.functional.linear(x, w, b),
                "plain": lambda a=plain, x=x, o=out: ext.bsmm(x, *a, o),
                "huge": lambda a=huge, x=x, o=out: ext.bsmm(x, *a, o),
            }
            s = timed(calls, rounds, rng)
            m = {n: median_us(v) for n, v in s.items()}
            print(f"{inp}->{out} {c}x dense {m['dense']:.0f} denseHP {m['denseHP']:.0f} "
                  f"(x{paired(s, 'dense', 'denseHP'):.3f}) plain {m['plain']:.1f} huge {m['huge']:.1f} "
                  f"plain/huge {paired(s, 'plain', 'huge'):.3f} | ideal plain {m['dense'] / m['plain'] / c:.2f} "
                  f"huge {m['dense'] / m['huge'] / c:.2f}", flush=True)


if __name__ == "__main__":
    main()
