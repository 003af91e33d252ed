#!/bin/bash
# issue 10, 2026-12-06: peak host RAM at 215 and 1,000 slices, after da4a8b1, under the CPU lock
set -x
cd /work/main/benchmarks
PY=/work/main/.venv/bin/python
M=/work/main/benchmarks/results/cpu-2026-12-06
date -u
$PY bench_long_scan.py --workdir /tmp/samflare-bench --reuse --no-nnunet --json $M/long_default.json > $M/long_default.log 2>&1
date -u
$PY bench_long_scan.py --workdir /tmp/samflare-bench --reuse --no-nnunet --fast --json $M/long_fast.json > $M/long_fast.log 2>&1
date -u
