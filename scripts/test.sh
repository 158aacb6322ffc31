#!/usr/bin/env bash
# The test command README.md gives and .ci/run runs: install what the test suite needs, then run it.
#
#   bash scripts/test.sh [PYTEST_ARGS...]     # e.g. bash scripts/test.sh tests/test_model.py -x
#
# 1. A browser for the chat page's test (tests/test_chat_page.py): Chromium (chromium, chromium-browser or
#    google-chrome) and chromedriver, found on PATH. When one is missing and we are root on a machine with
#    apt-get (Debian, as CI), apt-get installs Debian's chromium and chromium-driver; anywhere else this stops
#    and says what to install. The test is never skipped.
# 2. torch, when it is not installed: the CPU build of torch==2.13.0. Where pip's own pick is a CPU build
#    (CI: a +cpu wheel lies in pip's find-links) pip installs that; anywhere else a plain torch from PyPI
#    is a multi-GB CUDA build on Linux, so it comes from PyTorch's CPU index.
# 3. pip install -e ".[dev]": dsv3 and everything the tests use.
# 4. python -m pytest -q, with this script's arguments.
set -euo pipefail

TORCH_VERSION="2.13.0"
TORCH_CPU_INDEX="https://download.pytorch.org/whl/cpu"
BROWSERS=(chromium chromium-browser google-chrome)

cd "$(dirname "${BASH_SOURCE[0]}")/.."

missing_browser() {  # what of the browser test's needs is not on PATH (nothing when all is there)
    local b out=""
    for b in "${BROWSERS[@]}"; do command -v "$b" >/dev/null && break; b=""; done
    [ -n "$b" ] || out="a Chromium (none of: ${BROWSERS[*]})"
    command -v chromedriver >/dev/null || out="${out:+$out, }chromedriver"
    echo -n "$out"
}

if [ -n "$(missing_browser)" ]; then
    if [ "$EUID" -eq 0 ] && command -v apt-get >/dev/null; then
        echo ">> apt-get install chromium chromium-driver (for tests/test_chat_page.py)"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
            >/dev/null || true
    fi
    missing=$(missing_browser)
    if [ -n "$missing" ]; then
        cat >&2 <<MSG
scripts/test.sh: the chat page's browser test (tests/test_chat_page.py) needs Chromium and chromedriver on
PATH, and this machine lacks: ${missing}
Install them, then run this again (as root on a machine with apt-get, this script installs them itself):
  Debian:  apt-get install chromium chromium-driver
  Ubuntu:  apt-get install chromium-browser chromium-chromedriver
  other:   a Chrome or Chromium, and the chromedriver of the same major version, both on PATH
MSG
        exit 1
    fi
fi

if ! python -c 'import torch' 2>/dev/null; then
    pick=$(python -m pip install --dry-run --quiet --no-deps --report - "torch==$TORCH_VERSION" 2>/dev/null \
           | python -c 'import json, sys; print(json.load(sys.stdin)["install"][0]["metadata"]["version"])' || true)
    if [[ $pick == *+cpu ]]; then
        echo ">> pip install torch==$TORCH_VERSION (the CPU build, $pick)"
        python -m pip install -q "torch==$TORCH_VERSION"
    else
        echo ">> pip install torch==$TORCH_VERSION from $TORCH_CPU_INDEX (the CPU build)"
        python -m pip install -q "torch==$TORCH_VERSION" --index-url "$TORCH_CPU_INDEX"
    fi
fi

echo '>> pip install -e ".[dev]"'
python -m pip install -q -e ".[dev]"

echo ">> python -m pytest -q $*"
exec python -m pytest -q "$@"
