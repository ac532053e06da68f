#!/usr/bin/env bash
# GPU benchmark of the sampler's fast path (bench/gpu.py): samples/s per option (fp32, the ADM fp16 blocks,
# bf16/fp16 autocast, channels_last, torch.compile) and batch size, against the forward-only roofline, for the
# project's ADMUNet with guided-diffusion's 256x256_uncond flags and a deeplabv3_resnet50 segmenter, both with
# random weights. Installs nothing and downloads nothing; finishes in under 5 minutes (a time budget inside,
# a hard timeout here).
#
#   bench/gpu.sh                          # on a machine with a CUDA GPU
#   bench/gpu.sh --cpu-smoke              # tiny models on the CPU: tests the script's logic anywhere
#   bench/gpu.sh --batch-sizes 32 64 --options bf16 bf16+compile --json results.json
#
# Needs: python3 (or $PYTHON) with torch, numpy and scipy; torchvision optional (else a wide TinySegNet).
# Exit codes: 0 all self-checks passed; 1 a self-check failed (non-finite outputs, votes not reproducible);
# 2 missing packages or no GPU; 124 the hard timeout.
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
