#!/usr/bin/env bash
# The device check, as one script for a lent NVIDIA H100/H200 (no internet there): install the carried wheels
# (bitsandbytes, llguidance ... in .whl/, see /work/.library/device/README.md), then gpu_check once with CUDA
# graphs and once with --compile. Results land in $OUT (the device tool brings them back).
set -uo pipefail
OUT=${OUT:-bench/results}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, bitsandbytes; print(torch.__version__, transformers.__version__, bitsandbytes.__version__)"
python3 bench/gpu_check.py --new-tokens "${NEW_TOKENS:-128}" --out "$OUT/gpu_check.json" \
  --summary-out "$OUT/gpu_summary.json" 2>&1 | grep -v "Loading weights" | tee "$OUT/gpu_check.log"
python3 bench/gpu_check.py --compile --skip-split-check --skip-prefix-check --modes none \
  --new-tokens "${NEW_TOKENS:-128}" --out "$OUT/gpu_check-compile.json" --summary-out "$OUT/gpu_summary-compile.json" \
  2>&1 | grep -v "Loading weights" | tee "$OUT/gpu_check-compile.log"
