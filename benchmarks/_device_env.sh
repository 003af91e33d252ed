# Sourced by the device scripts (gpu_check.sh, gpu_learning.sh) from the repository root, with PY set: the device
# machine has no package index, so nnU-Net and its dependencies come as wheels in .whl/ (README, "GPU"); then the
# repository itself on the path, no torch.compile, unbuffered logs.
if [ -d .whl ] && ! "$PY" -c "import nnunetv2" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || exit 2
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH
fi
if ! "$PY" -c "import nnunetv2" 2>/dev/null; then
  echo "no nnunetv2 for $PY and no .whl/ to install it from: build .whl/ and carry it (benchmarks/README.md, GPU)" >&2
  exit 2
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} nnUNet_compile=f PYTHONUNBUFFERED=1
