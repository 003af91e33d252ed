#!/usr/bin/env bash
# Issue 12's GPU learning benchmark in one device call: the cascade in the paper's configuration (segmenter
# 2.0/1.5/1.5 mm, 96^3, batch 2) and plain nnU-Net 3d_fullres, each trained for the same minutes through stock
# nnUNetv2_train, both predicted and scored the same way; iterations/s of both trainers (benchmarks/README.md).
# Usage (repository root): bash benchmarks/gpu_learning.sh [OUT_DIR]   (default: $OUT, else /tmp/samflare-gpu-learning)
#   GPU_LEARNING_MINUTES=N: budget of the whole run (default 8; the command limit is 10 minutes)
#   GPU_LEARNING_TINY=1: the same on the CPU with tiny settings (a rehearsal; the numbers mean nothing)
set -u
cd "$(dirname "$0")/.." || exit 2
OUT_DIR=${1:-${OUT:-/tmp/samflare-gpu-learning}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}

# nnU-Net from the kit's wheels where it is missing, the repository on the path.
source benchmarks/_device_env.sh

if [ "${GPU_LEARNING_TINY:-0}" = 1 ]; then
  ARGS=(--device cpu --preset gpu --minutes "${GPU_LEARNING_MINUTES:-7}" --reserve-minutes 2
        --segmenter-spacing 6 6 6 --segmenter-patch 32 32 32 --iterations 2 --val-iterations 1
        --nnunet-iterations 1 --nnunet-val-iterations 1)
else
  ARGS=(--device cuda --preset gpu --minutes "${GPU_LEARNING_MINUTES:-8}")
fi
{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  git rev-parse HEAD 2>/dev/null
} > "$OUT_DIR/environment.txt" 2>&1
cd benchmarks || exit 2
timeout 590 "$PY" bench_learning.py "${ARGS[@]}" --workdir "$(mktemp -d /tmp/samflare-learning-XXXX)" \
  --results "$OUT_DIR" 2>&1 | tee "$OUT_DIR/bench_learning.log"
exit "${PIPESTATUS[0]}"
