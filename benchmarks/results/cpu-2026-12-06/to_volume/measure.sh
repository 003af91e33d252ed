#!/bin/bash
# issue 10, 2026-12-06 (second session): to_volume as a canonical channels-last view, against BEFORE (git archive
# 8d615d5) in the same run, interleaved, one job at a time under the CPU lock
set -x
cd /work/main/benchmarks
PY=/work/main/.venv/bin/python
B="--device cpu --workdir /tmp/samflare-bench --reuse"
M=/work/main/benchmarks/results/cpu-2026-12-06/to_volume
BEFORE=/tmp/base_8d615d5
SEG=/tmp/s11/trained_seg/nnUNetTrainer_SAMFlareSegmenter__samflarePlans__3d_segmenter
date -u
for i in 1 2 3; do
$PY bench_cascade.py $B --runs samflare-inprocess samflare-cli --sample-interval 0.1 --json $M/after_default$i.json > $M/after_default$i.log 2>&1
$PY bench_cascade.py $B --runs samflare-inprocess samflare-cli --sample-interval 0.1 --source $BEFORE --json $M/before_default$i.json > $M/before_default$i.log 2>&1
done
date -u
$PY bench_cascade.py $B --runs samflare-inprocess samflare-cli --sample-interval 0.1 --fast --json $M/after_fast1.json > $M/after_fast1.log 2>&1
$PY bench_cascade.py $B --runs samflare-inprocess samflare-cli --sample-interval 0.1 --fast --source $BEFORE --json $M/before_fast1.json > $M/before_fast1.log 2>&1
date -u
$PY bench_cascade_accuracy.py --baseline-src $BEFORE --segmenter $SEG --workdir /tmp/samflare-bench --reuse --json $M/acc_post.json > $M/acc_post.log 2>&1
$PY bench_cascade_accuracy.py --baseline-src $BEFORE --segmenter $SEG --workdir /tmp/samflare-bench --reuse --no-postprocessing --json $M/acc_raw.json > $M/acc_raw.log 2>&1
date -u
$PY bench_long_scan.py --workdir /tmp/samflare-bench --reuse --no-nnunet --json $M/long_default.json > $M/long_default.log 2>&1
date -u
