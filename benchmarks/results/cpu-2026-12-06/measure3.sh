#!/bin/bash
# issue 10, 2026-12-06, the class head in float32 under --fast: this tree against PREVIOUS (git archive da4a8b1)
# in the same run, and the labels against BEFORE (git archive 99846c9); one job at a time under the CPU lock
set -x
cd /work/main/benchmarks
PY=/work/main/.venv/bin/python
B="--device cpu --workdir /tmp/samflare-bench --reuse"
M=/work/main/benchmarks/results/cpu-2026-12-06
PREVIOUS=/tmp/tree_da4a8b1
BEFORE=/tmp/base_head
SEG=/tmp/s11/trained_seg/nnUNetTrainer_SAMFlareSegmenter__samflarePlans__3d_segmenter
date -u
for i in 1 2 3; do
$PY bench_cascade.py $B --runs samflare-inprocess samflare-cli --sample-interval 0.1 --fast --json $M/head_fast$i.json > $M/head_fast$i.log 2>&1
$PY bench_cascade.py $B --runs samflare-inprocess samflare-cli --sample-interval 0.1 --fast --source $PREVIOUS --json $M/previous_fast$i.json > $M/previous_fast$i.log 2>&1
done
date -u
$PY bench_cascade_accuracy.py --baseline-src $BEFORE --segmenter $SEG --workdir /tmp/samflare-bench --reuse --json $M/acc_post_head.json > $M/acc_post_head.log 2>&1
$PY bench_cascade_accuracy.py --baseline-src $BEFORE --segmenter $SEG --workdir /tmp/samflare-bench --reuse --no-postprocessing --json $M/acc_raw_head.json > $M/acc_raw_head.log 2>&1
date -u
