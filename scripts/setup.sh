#!/usr/bin/env bash
# Create .venv and install raydist with its test tools, on a fresh CPU machine.
#   bash scripts/setup.sh            # CPU: installs torch==2.13.0 (CPU build) first, then raydist
#   RAYDIST_GPU=1 bash scripts/setup.sh   # GPU: keeps the torch you installed into .venv yourself
# torch is pinned first on CPU because an unpinned torch makes pip fetch a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if [ -z "${RAYDIST_GPU:-}" ]; then
  .venv/bin/python -m pip install -q -c scripts/constraints-cpu.txt torch==2.13.0
  .venv/bin/python -m pip install -q -c scripts/constraints-cpu.txt -e ".[test]"
else
  .venv/bin/python -m pip install -q -e ".[test]"
fi
.venv/bin/python -c "import raydist, torch, ray, deepspeed; print('raydist', raydist.__version__, '| torch', torch.__version__, '| ray', ray.__version__, '| deepspeed', deepspeed.__version__)"
