#!/usr/bin/env bash
# Our engine (both unroll modes, and bf16) and the official-style stand-in, each under the default
# glibc allocator and under tuned settings (ALLOCATORS="default tuned"), one JSON line each in OUT.
#   bash benchmarks/run_step_benchmarks.sh OUT.jsonl [step-benchmark arguments...]
# e.g. bash benchmarks/run_step_benchmarks.sh docs/step-10of40.jsonl --window 10 \
#        --total-inner-steps 40 --curriculum-start 27 --real-batch 500
set -euo pipefail
cd "$(dirname "$0")/.."
out=$1; shift
PY=${PYTHON:-python}
# glibc caps the mmap threshold at 32 MiB on 64-bit; trim/top-pad keep freed heap for reuse.
TUNED="MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=17179869184 MALLOC_TOP_PAD_=1073741824"
: > "$out"
for alloc in ${ALLOCATORS:-default tuned}; do
  envs=""; [ "$alloc" = tuned ] && envs=$TUNED
  for engine in "bench_distill_step.py --unroll recompute" "bench_distill_step.py --unroll store" \
                "bench_distill_step.py --unroll recompute --precision bf16" "official_style_step.py"; do
    echo "== $alloc: $engine $*" >&2
    env $envs "$PY" benchmarks/$engine "$@" | "$PY" -c "import json,sys; d=json.load(sys.stdin); d['allocator']='$alloc'; print(json.dumps(d))" >> "$out"
  done
done
