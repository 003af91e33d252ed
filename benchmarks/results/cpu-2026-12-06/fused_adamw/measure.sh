#!/usr/bin/env bash
# A/B of the optimizer: BEFORE = benchmarks of a313150 (torch.optim.AdamW, per-tensor loop on a CPU),
# NOW = this tree (build_adamw, fused). Same package, same network; alternating runs.
set -u
PY=/work/main/.venv/bin/python
OUT=${OUT:-/tmp/s13/fused_ab}
for size in 32 32 48; do
  for tree in before now; do
    dir=/work/main/benchmarks; [ $tree = before ] && dir=/tmp/s13/base/benchmarks
    (cd $dir && $PY bench_train_step.py --device cpu --no-nnunet --variants plain --segmenter-size $size $size $size \
      --repeats 7 --warmup 2 --data /work/main/nnunet_samflare/example_data/flare_like --json "$OUT/train_step_${size}_${tree}_$(date +%H%M%S).json") 2>&1 | grep -E "median step"
  done
done
