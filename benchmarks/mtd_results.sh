#!/usr/bin/env bash
# Reproduces the MTD table of docs/results.md: trains on all of MTD train/good with the default
# settings (and the reference encoders), evaluates each on the test split, prints the table.
# Usage: bash benchmarks/mtd_results.sh [DATA (default ../shared/data/mtd)] [OUT (default runs/mtd)]
set -euo pipefail
DATA=${1:-../shared/data/mtd}
OUT=${2:-runs/mtd}
run() {  # name, extra fit options...
  local name=$1; shift
  pedenet fit "$DATA" --out "$OUT/$name" --overwrite --quiet "$@"
  pedenet evaluate "$OUT/$name" --no-overlays --quiet
}
run default
run pretrained-untrained --steps 0
run scratch --encoder scratch
run scratch-untrained --encoder scratch --steps 0
python benchmarks/results_table.py "$OUT"/default "$OUT"/pretrained-untrained "$OUT"/scratch "$OUT"/scratch-untrained
