#!/bin/bash
# issue 10, 2026-12-06: the cascade on the Intel Xeon (AMX-BF16) VM, one job at a time under the CPU lock
set -x
cd /work/main/benchmarks
PY=/work/main/.venv/bin/python
B="--device cpu --workdir /tmp/samflare-bench --reuse"
M=/work/main/benchmarks/results/cpu-2026-12-06
SEG=/tmp/s11/trained_seg/nnUNetTrainer_SAMFlareSegmenter__samflarePlans__3d_segmenter
date -u
$PY bench_cascade.py $B --runs samflare-inprocess samflare-cli --sample-interval 5 --fast --json $M/t_fast.json > $M/t_fast.log 2>&1
date -u
$PY bench_cascade.py $B --runs samflare-inprocess samflare-cli --sample-interval 5 --json $M/t_default.json > $M/t_default.log 2>&1
date -u
for i in 1 2; do
$PY bench_cascade.py $B --runs samflare-cli --sample-interval 0.1 --fast --json $M/mem_fast$i.json > $M/mem_fast$i.log 2>&1
$PY bench_cascade.py $B --runs samflare-cli --sample-interval 0.1 --json $M/mem_default$i.json > $M/mem_default$i.log 2>&1
done
date -u
$PY bench_cascade_accuracy.py --baseline-src /tmp/base_head --segmenter $SEG --workdir /tmp/samflare-bench --reuse --json $M/acc_post.json > $M/acc_post.log 2>&1
date -u
