#!/usr/bin/env bash
# Everything issue 10 asks of a GPU, in one device call of at most 8 minutes (time limits 280 + 50 + 150 s;
# benchmarks/README.md, "GPU"):
#   1. cascade, file in -> file out, per 512x512x215 case: time and peak GPU memory of `samflare predict`
#      (in-process stages and the CLI) beside stock `nnUNetv2_predict --disable_tta` on the same case;
#      then the in-process run again with --fast (on CUDA: the segmenter in channels-last memory format with
#      layout-keeping norms, under nnU-Net's fp16 autocast; --fast's bfloat16 is for CPUs only);
#   2. segmenter training step, batch 2 x 96^3, AMP, forward + backward + optimizer, beside nnU-Net's default
#      3d_fullres network of the same dataset (measured first), then in its same-function variants (channels-last,
#      depthwise convolutions as 2-D slices, both, grouped 1x1x1 as matmuls), one line each as it finishes;
#      torch.profiler tables and Chrome traces of the plain and channels-last segmenter steps.
# Usage (repository root): bash benchmarks/gpu_check.sh [OUT_DIR]   (default: $OUT, else /tmp/samflare-gpu-check)
#   GPU_CHECK_TINY=1: the same steps on the CPU with tiny sizes (a rehearsal; numbers meaningless).
# Every step has its own time limit, writes its log and JSON under OUT_DIR, and a failed step does not stop the
# next one; the exit status is that of the worst step.
set -u
cd "$(dirname "$0")/.." || exit 2
OUT_DIR=${1:-${OUT:-/tmp/samflare-gpu-check}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}

# nnU-Net from the kit's wheels where it is missing, the repository on the path.
source benchmarks/_device_env.sh

WORK=${GPU_CHECK_WORKDIR:-/tmp/samflare-gpu-bench}
if [ "${GPU_CHECK_TINY:-0}" = 1 ]; then
  DEVICE=cpu
  CASE_ARGS=(--size 64 64 43 --segmenter-spacing 6 6 6 --segmenter-patch 32 32 32 --locator-patch 64 64 64
             --locator-fit-steps 10)
  CASCADE_ARGS=(--repeats 1 --warmup 0)
  STEP_ARGS=(--segmenter-size 32 32 32 --nnunet-patch 32 32 32 --repeats 1 --warmup 1)
else
  DEVICE=cuda
  CASE_ARGS=()
  CASCADE_ARGS=(--repeats 3 --warmup 1)
  STEP_ARGS=(--repeats 6 --warmup 2)
fi

status=0
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit} s) ==="
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc after $((SECONDS - start)) s"
  tail -n 60 "$OUT_DIR/$name.log"
  [ $rc -gt $status ] && status=$rc
  return 0
}

{
  date -u +%Y-%m-%dT%H:%M:%SZ
  uptime
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import torch, nnunetv2; print('torch', torch.__version__, 'cuda', torch.version.cuda,
            'available', torch.cuda.is_available())"
  git rev-parse HEAD 2>/dev/null
} > "$OUT_DIR/environment.txt" 2>&1
cat "$OUT_DIR/environment.txt"

cd benchmarks || exit 2
step cascade 280 "$PY" bench_cascade.py --device "$DEVICE" "${CASE_ARGS[@]}" "${CASCADE_ARGS[@]}" \
  --runs samflare-inprocess samflare-cli nnunet-cli-notta --workdir "$WORK" --reuse --json "$OUT_DIR/cascade.json"
step cascade_fast 50 "$PY" bench_cascade.py --device "$DEVICE" "${CASE_ARGS[@]}" "${CASCADE_ARGS[@]}" \
  --runs samflare-inprocess --fast --workdir "$WORK" --reuse --json "$OUT_DIR/cascade_fast.json"
PLANS=$(ls "$WORK"/nnUNet_preprocessed/Dataset*/nnUNetPlans.json 2>/dev/null | head -n 1)
step train_step 150 "$PY" bench_train_step.py --device "$DEVICE" ${PLANS:+--plans "$PLANS"} "${STEP_ARGS[@]}" \
  --profile-dir "$OUT_DIR/profile" --json "$OUT_DIR/train_step.json"
echo "outputs in $OUT_DIR; worst exit status $status"
exit $status
