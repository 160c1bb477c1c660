#!/usr/bin/env bash
# What the GPU check ran on a lent H100/H200 (no internet there): carried wheels, then gpu_check with --compile.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, bitsandbytes; print(torch.__version__, transformers.__version__, bitsandbytes.__version__)"
python3 bench/gpu_check.py --compile --new-tokens "${NEW_TOKENS:-96}" --out "${OUT:-bench/results}/gpu_check.json" 2>&1 \
  | grep -v "Loading weights" | tee "${OUT:-/tmp}/gpu_check.log"
