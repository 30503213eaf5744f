#!/usr/bin/env bash
# The GPU check (issue 32): CUDA analysis equals CPU analysis, throughput on the GPU against
# the CPU and the plain MONAI loop, one chest training epoch in float32, bfloat16, float16.
# At most 5 minutes on one GPU; prints one Markdown table (put it in docs/benchmarks.md).
#
#   bench/device_check.sh [--device cuda:0]
#
# Uses $PYTHON (default .venv/bin/python, else python3) with a CUDA build of PyTorch and
# medvision importable, and the data in ../shared/data.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() or '--device' in sys.argv[1:] else 'no CUDA device: pass --device cpu --smoke to try the code paths')" "$@"
exec timeout 300 "$PYTHON" bench/device_check.py "$@"
