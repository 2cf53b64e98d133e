#!/usr/bin/env bash
# One command that sets everything up: a virtual environment in .venv holding qwen2vl with all
# its extras, plus the test oracle (transformers 5.24.0 and what its Qwen2-VL processors need).
# Works on a machine with only python3 (>= 3.10); run again at any time, it is idempotent.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

# The oracle's video loader (torchcodec) needs the system's ffmpeg libraries; our own decoder (PyAV)
# does not. Install it where we can, warn where we cannot.
if ! command -v ffmpeg >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg >/dev/null
    else
        echo "setup.sh: ffmpeg not found; install it (apt-get install ffmpeg) for the video tests" >&2
    fi
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch 2.14.1 + torchvision 0.29.1: the pair torchvision/torchcodec load beside (see README).
.venv/bin/pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/pip install -q -e ".[all,test]"
echo "setup.sh: ready. Try: .venv/bin/qwen2vl run --image examples/example.png \"What colour is the shape?\""
