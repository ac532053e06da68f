#!/usr/bin/env bash
# GPU benchmark (bench/gpu.py): the machine's bf16 matmul peak and copy bandwidth, then the job's shapes
# (a 1024 x 2048 Cityscapes image and a 480 x 480 Pascal-Context image, the ADM-256 denoiser in tile mode and a
# full-resolution segmenter of HRNet's size class, random weights) per option (fp16 autocast; fp16 with the
# tiles of all samples batched; the ADM fp16 blocks; bf16; fp32; last, fp16 with batched tiles and
# torch.compile): samples/s, achieved TFLOP/s, fraction of the measured peak,
# the cost model's predicted time against the measured one, peak memory. Rows are printed and appended to
# OUT/gpu.jsonl as they are measured; an option that fails (out of memory, compile error) is recorded and the
# run goes on. Installs nothing, downloads nothing, finishes in under 5 minutes (a budget inside, a hard
# timeout here).
#
#   bench/gpu.sh OUT                                  # on a machine with a CUDA GPU
#   bench/gpu.sh OUT --cpu-smoke                      # tiny models on the CPU: tests the script's logic anywhere
#   bench/gpu.sh OUT --workloads pascal-tile --options fp16 fp16+tiles+compile
#
# Needs: python3 (or $PYTHON) with torch, numpy and scipy; torchvision optional (else TinySegNet width 40).
# Exit codes: 0 every row measured and its checks passed; 1 a row failed (error or check); 2 missing packages
# or no GPU; 124 the hard timeout.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

"$PYTHON" - <<'EOF' || exit 2
import importlib.util
import sys

missing = [m for m in ("torch", "numpy", "scipy") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"bench/gpu.sh: missing Python packages {missing}; this script installs nothing")
import torch

print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}, "
      f"torchvision: {importlib.util.find_spec('torchvision') is not None}")
EOF

if [[ " $* " != *" --cpu-smoke "* ]] && command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
fi
exec timeout 295 "$PYTHON" bench/gpu.py "$@"
