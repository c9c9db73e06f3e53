#!/bin/bash
# Three fresh processes of the 40 target points with the float16 contender, then their medians (stop 48).
set -e
cd "$(dirname "$0")/../../.."
out=benchmarks/records/blocksparse_half_v20
for n in 1 2 3; do
  echo "run $n start $(date +%H:%M:%S)" >> $out/times.txt
  MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 python benchmarks/blocksparse_grid.py \
    --compressions 10 --batches 1 32 --float16 --json $out/targets_$n.json > $out/targets_$n.md 2>&1
  echo "run $n end $(date +%H:%M:%S)" >> $out/times.txt
done
python benchmarks/blocksparse_grid.py --merge $out/targets_1.json $out/targets_2.json $out/targets_3.json > $out/merged.md
