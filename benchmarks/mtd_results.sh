#!/usr/bin/env bash
# Reproduces the MTD table of docs/results.md: trains on all of MTD train/good with the default
# settings and with the reference encoders, evaluates each on the test split, prints the tables.
# The four runs go two at a time with one thread each (how docs/results.md was measured on
# 2 cores); timings of a run alone with 2 threads are lower.
# Usage: bash benchmarks/mtd_results.sh [DATA (default ../shared/data/mtd)] [OUT (default runs/mtd)]
set -euo pipefail
DATA=${1:-../shared/data/mtd}
OUT=${2:-runs/mtd}
mkdir -p "$OUT"
export OMP_NUM_THREADS=1
run() {  # name, extra fit options...
  local name=$1; shift
  pedenet fit "$DATA" --out "$OUT/$name" --overwrite --quiet "$@"
  pedenet evaluate "$OUT/$name" --no-overlays --quiet
}
run default > "$OUT.default.log" 2>&1 &
run pretrained-untrained --steps 0 > "$OUT.pretrained-untrained.log" 2>&1 &
wait
run scratch --encoder scratch > "$OUT.scratch.log" 2>&1 &
run scratch-untrained --encoder scratch --steps 0 > "$OUT.scratch-untrained.log" 2>&1 &
wait
python benchmarks/results_table.py "$OUT"/default "$OUT"/pretrained-untrained "$OUT"/scratch "$OUT"/scratch-untrained
