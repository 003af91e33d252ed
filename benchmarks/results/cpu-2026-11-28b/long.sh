#!/bin/bash
set -x
cd /work/main/benchmarks
PY=/work/main/.venv/bin/python
FIT=/tmp/samflare-bench/fitted/nnUNetTrainer_SAMFlareSegmenter__samflarePlans__3d_segmenter
date -u
$PY bench_long_scan.py --workdir /tmp/samflare-bench --reuse --segmenter $FIT --no-nnunet --json /tmp/s10/m/long_default.json > /tmp/s10/m/long_default.log 2>&1
date -u
$PY bench_long_scan.py --workdir /tmp/samflare-bench --reuse --segmenter $FIT --no-nnunet --fast --json /tmp/s10/m/long_fast.json > /tmp/s10/m/long_fast.log 2>&1
date -u
