#!/bin/bash
# issue 10, 2026-11-28 session 2: one job at a time under the CPU lock
set -x
cd /work/main/benchmarks
PY=/work/main/.venv/bin/python
B="--device cpu --workdir /tmp/samflare-bench --reuse"
M=/tmp/s10/m
BEFORE=/tmp/before_f585
SEG=/tmp/probe/trained_seg/nnUNetTrainer_SAMFlareSegmenter__samflarePlans__3d_segmenter
date -u
$PY bench_cascade.py $B --runs samflare-inprocess samflare-cli --sample-interval 5 --fast --json $M/t_fast.json > $M/t_fast.log 2>&1
date -u
$PY bench_cascade.py $B --runs samflare-inprocess samflare-cli --sample-interval 5 --fast --source $BEFORE --json $M/t_fast_before.json > $M/t_fast_before.log 2>&1
date -u
for i in 1 2; do
$PY bench_cascade.py $B --runs samflare-cli --sample-interval 5 --fast --json $M/t_fast_cli$i.json > $M/t_fast_cli$i.log 2>&1
$PY bench_cascade.py $B --runs samflare-cli --sample-interval 5 --fast --source $BEFORE --json $M/t_fast_before_cli$i.json > $M/t_fast_before_cli$i.log 2>&1
done
date -u
$PY bench_cascade.py $B --runs samflare-inprocess samflare-cli --sample-interval 5 --json $M/t_default.json > $M/t_default.log 2>&1
date -u
$PY bench_cascade.py $B --runs samflare-inprocess samflare-cli --sample-interval 5 --source $BEFORE --json $M/t_default_before.json > $M/t_default_before.log 2>&1
date -u
$PY bench_cascade.py $B --runs samflare-cli --sample-interval 0.1 --fast --json $M/mem_fast.json > $M/mem_fast.log 2>&1
date -u
$PY bench_cascade.py $B --runs samflare-cli --sample-interval 0.1 --json $M/mem_default.json > $M/mem_default.log 2>&1
date -u
$PY bench_cascade_accuracy.py --baseline-src $BEFORE --segmenter $SEG --workdir /tmp/samflare-bench --reuse --no-postprocessing --json $M/acc_raw.json > $M/acc_raw.log 2>&1
date -u
$PY bench_cascade_accuracy.py --baseline-src $BEFORE --segmenter $SEG --workdir /tmp/samflare-bench --reuse --json $M/acc_post.json > $M/acc_post.log 2>&1
date -u
