#!/usr/bin/env bash
# The 40 target points (10x, batch 1 and 32, 1 and 2 threads) with kernel v19 and v20 in alternating fresh
# processes, three of each, on an idle machine (v20 first in each pair). v20 was not kept: the library is v19,
# so v19 runs from a clean worktree and v20 from this tree with the patch applied:
#   git worktree add /tmp/wt_v19 HEAD
#   git apply benchmarks/records/kernel_v20/v20_prefetch.patch
#   bash benchmarks/records/kernel_v20/ab_targets.sh /tmp/wt_v19 benchmarks/records/kernel_v20
#   git apply -R benchmarks/records/kernel_v20/v20_prefetch.patch
set -euo pipefail
old_tree=$1 out=$2
export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824
for i in 1 2 3; do
  for build in v20 v19; do
    if [ "$build" = v19 ]; then src=$old_tree/src; else src=$PWD/src; fi
    echo "$build run $i start $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$out/times.txt"
    PYTHONPATH=$src python benchmarks/blocksparse_grid.py --compressions 10 --batches 1 32 \
      --json "$out/targets_${build}_$i.json" > "$out/targets_${build}_$i.md"
  done
done
echo "done $(date +%T)" | tee -a "$out/times.txt"
