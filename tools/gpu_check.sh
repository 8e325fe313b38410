#!/usr/bin/env bash
# The prepared GPU check, `python -m gradspace.bench gpu`, for a lent GPU machine that has PyTorch with CUDA,
# transformers and pytest but no network (see docs/gpu.md for what it measures):
#   bash tools/gpu_check.sh --prepare     here, with a package index: wheels of what that machine lacks, into .whl/
#                                         (pure-Python galore-torch; bitsandbytes' manylinux wheel for its kernels)
#   bash tools/gpu_check.sh [OUT]         there: installs .whl/ (when present) into /tmp/site and writes OUT/gpu.md
#                                         (default docs/gpu.md); about 8 minutes on one H200
#   bash tools/gpu_check.sh --dry-run     anywhere: the same check on the CPU with tiny shapes (CI runs this)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && py=.venv/bin/python
case "${1:-}" in
  --prepare)
    mkdir -p .whl
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    "$py" -m pip download --quiet --no-deps -d .whl galore-torch==1.0
    "$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2
    ls -l .whl
    ;;
  --dry-run)
    PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} "$py" -m gradspace.bench --threads 1 gpu --dry-run
    ;;
  *)
    out=${1:-docs}
    if compgen -G ".whl/*.whl" > /dev/null; then
      "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
      export PYTHONPATH=/tmp/site
    fi
    export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    "$py" -m gradspace.bench gpu --out "$out/gpu.md"
    ;;
esac
