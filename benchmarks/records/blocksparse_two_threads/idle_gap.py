"""Does what runs just before the compiled two-thread LSTM call change its time? (2026-12-06, fifth stop)

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 \\
      python benchmarks/records/blocksparse_two_threads/idle_gap.py MODE 2

(``ADMMCOMPRESS_KERNEL_MARCH=haswell`` in front for the AVX2 build; ``GOMP_SPINCOUNT=infinite`` keeps OpenMP's
idle workers spinning.) The layer of ``co_run.py`` (LSTM 512, 10x, 16 steps, batch 32, ``lstm_layer``), called
for 12 s; each call timed alone after MODE: ``alone`` (back to back), ``after_dense`` (torch's LSTM first),
``after_sleep`` (5 ms asleep: the vCPUs may idle) or ``after_spin`` (5 ms of busy waiting). Prints the median.
"""

import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from co_run import build  # noqa: E402  (the same layer and checks as co_run.py)

mode, threads = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(threads)
dense, cpp = build("lstm", 512, 32)
times = []
with torch.inference_mode():
    for _ in range(5):
        dense()
        cpp()
    end = time.time() + 12
    while time.time() < end:
        if mode == "after_dense":
            dense()
        elif mode == "after_sleep":
            time.sleep(0.005)
        elif mode == "after_spin":
            stop = time.perf_counter() + 0.005
            while time.perf_counter() < stop:
                pass
        t0 = time.perf_counter()
        cpp()
        times.append((time.perf_counter() - t0) * 1e3)
print(json.dumps({"mode": mode, "threads": threads, "median_ms": round(statistics.median(times), 3),
                  "p10": round(sorted(times)[len(times) // 10], 3), "n": len(times)}))
