#!/usr/bin/env bash
# Install rmoe for this machine: torch 2.13.0 FIRST (so no other package can make pip resolve a
# different torch), then the package in editable mode with its test extras.
#   - No GPU: pip finds the local CPU wheel of torch 2.13.0 where one is provided (find-links), so
#     nothing CUDA is downloaded.
#   - GPU (Linux x86-64): the same `pip install torch==2.13.0` from the package index is the CUDA
#     build. For a specific CUDA version set TORCH_INDEX_URL to PyTorch's wheel index for it.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
  "$PYTHON" -m pip install --quiet "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
"$PYTHON" -m pip install --quiet -e ".[dev]"
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
"$PYTHON" -c "import torch, rmoe; print(f'rmoe {rmoe.__version__} with torch {torch.__version__} (cuda: {torch.cuda.is_available()})')"
