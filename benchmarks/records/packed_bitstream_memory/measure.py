"""Peak Python-side memory and time of writing and reading one packed bit stream, before and after stepping.

    python benchmarks/records/packed_bitstream_memory/measure.py --old 700231c

4,000,000 random 32-bit fields (a 15 MiB stream, as a float32 layer of 4M weights writes); peaks by
tracemalloc, which sees numpy's buffers. ``--old`` is the commit whose whole-stream BitWriter/BitReader is the
baseline (taken from git history: this project's own earlier code).
"""

from __future__ import annotations

import argparse
import subprocess
import time
import tracemalloc
from typing import Any

import numpy as np

from admmcompress.executors import packed


def timed_peak(call) -> tuple[Any, float, float]:
    tracemalloc.start()
    start = time.perf_counter()
    result = call()
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return result, peak / 2**20, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True)
    parser.add_argument("--count", type=int, default=4_000_000)
    args = parser.parse_args()
    path = f"{args.old}:src/admmcompress/executors/packed.py"
    source = subprocess.run(["git", "show", path], capture_output=True, text=True, check=True).stdout
    old: dict[str, Any] = {"np": np, "Any": Any}
    exec(source[source.index("class BitWriter:") : source.index("def _float_bits(")], old)
    values = np.random.default_rng(0).integers(0, 2**32, args.count, dtype=np.uint64)
    for name, writer, reader in (("before", old["BitWriter"], old["BitReader"]),
                                 ("after", packed.BitWriter, packed.BitReader)):
        def write(writer=writer):
            stream = writer()
            stream.write(values, 32)
            return stream.getvalue()

        data, write_mib, write_s = timed_peak(write)
        got, read_mib, read_s = timed_peak(lambda reader=reader, data=data: reader(data).read(values.size, 32))
        assert (got == values).all()
        print(f"{name}: stream {len(data) / 2**20:.1f} MiB; write peak {write_mib:.0f} MiB in {write_s:.2f} s; "
              f"read peak {read_mib:.0f} MiB in {read_s:.2f} s")


if __name__ == "__main__":
    main()
