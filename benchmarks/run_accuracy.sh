#!/usr/bin/env bash
# Accuracy on the shipped CIFAR-10 with the cpu-small preset: PoDD 1 and 0.5 IPC, RaT-BPTT 1 IPC,
# random-real 1 IPC, for each seed. One artifact folder and one JSON summary per run in OUT.
#   SEEDS="0 1 2" bash benchmarks/run_accuracy.sh OUT
# About 10 minutes per distillation run on 2 cores (random-real: about 3).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/accuracy}
mkdir -p "$out"
for seed in ${SEEDS:-0 1 2}; do
  for run in "podd 1" "podd 0.5" "rat-bptt 1" "random-real 1"; do
    set -- $run
    name="$1-ipc$2-seed$seed"
    [ -s "$out/$name.json" ] && continue  # finished before: keep it
    echo "== $name $(date -u +%H:%M:%S)" >&2
    podd-sweep distill --dataset parquet:../shared/datasets/cifar10-jpeg --preset cpu-small \
      --method "$1" --ipc "$2" --seed "$seed" --out "$out/$name" > "$out/$name.json.tmp"
    mv "$out/$name.json.tmp" "$out/$name.json"
  done
done
