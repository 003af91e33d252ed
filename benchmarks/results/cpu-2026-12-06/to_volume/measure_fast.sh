#!/bin/bash
# issue 10, 2026-12-06 (second session): --fast, this tree against BEFORE (git archive 8d615d5), two more pairs
set -x
cd /work/main/benchmarks
PY=/work/main/.venv/bin/python
B="--device cpu --workdir /tmp/samflare-bench --reuse"
M=/work/main/benchmarks/results/cpu-2026-12-06/to_volume
BEFORE=/tmp/base_8d615d5
date -u
for i in 2 3; do
$PY bench_cascade.py $B --runs samflare-inprocess samflare-cli --sample-interval 0.1 --fast --source $BEFORE --json $M/before_fast$i.json > $M/before_fast$i.log 2>&1
$PY bench_cascade.py $B --runs samflare-inprocess samflare-cli --sample-interval 0.1 --fast --json $M/after_fast$i.json > $M/after_fast$i.log 2>&1
done
date -u
