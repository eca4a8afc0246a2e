#!/usr/bin/env bash
# Install the two peer engines for the side-by-side serving benchmark (scripts/bench/_peers.py):
#   (a) ctranslate2==4.8.5 into .venv, within scripts/constraints-cpu.txt so torch & co. stay as they are
#       (a prebuilt manylinux wheel, ~43 MB; it adds only ctranslate2 itself);
#   (b) a separate venv .venv-llamacpp with llama-cpp-python[server]==0.3.36, built from source for CPU
#       (pip compiles the vendored llama.cpp with cmake; cmake is taken from PyPI if the system one is missing).
# Idempotent: each step is skipped when its package at that version is already importable.
# Time, measured on a 2-core CPU box (Python 3.11, no llama-cpp-python wheel cached): 10 min 05 s in all, almost all of it (b)
# compiling llama.cpp at CMAKE_BUILD_PARALLEL_LEVEL=2 ((a) takes seconds); a rerun with both in place: 3 s.
#   bash scripts/bench/setup_peers.sh
#   CMAKE_BUILD_PARALLEL_LEVEL=4 bash scripts/bench/setup_peers.sh   # build llama.cpp with more cores
set -euo pipefail
cd "$(dirname "$0")/../.."

CT2_VERSION=4.8.5
LLAMA_CPP_VERSION=0.3.36
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"

# (a) CTranslate2 in the main venv.
if [ ! -x .venv/bin/python ]; then
  echo "no .venv: run scripts/setup.sh first" >&2
  exit 1
fi
if .venv/bin/python -c "import ctranslate2, sys; sys.exit(ctranslate2.__version__ != '$CT2_VERSION')" 2>/dev/null; then
  echo "ctranslate2 $CT2_VERSION already in .venv"
else
  torch_before=$(.venv/bin/python -c "import torch; print(torch.__version__)")
  .venv/bin/python -m pip install -q -c scripts/constraints-cpu.txt "ctranslate2==$CT2_VERSION"
  torch_after=$(.venv/bin/python -c "import torch; print(torch.__version__)")
  if [ "$torch_before" != "$torch_after" ]; then
    echo "installing ctranslate2 changed torch $torch_before -> $torch_after" >&2
    exit 1
  fi
fi

# (b) llama-cpp-python's OpenAI-compatible server in its own venv (its deps must not touch .venv).
if [ ! -x .venv-llamacpp/bin/python ]; then
  python3 -m venv .venv-llamacpp
fi
if .venv-llamacpp/bin/python -c "
import sys, llama_cpp, llama_cpp.server.app, uvicorn
sys.exit(llama_cpp.__version__ != '$LLAMA_CPP_VERSION')" 2>/dev/null; then
  echo "llama-cpp-python $LLAMA_CPP_VERSION already in .venv-llamacpp"
else
  .venv-llamacpp/bin/python -m pip install -q --upgrade pip
  if ! command -v cmake >/dev/null 2>&1; then
    .venv-llamacpp/bin/python -m pip install -q cmake
    export PATH="$PWD/.venv-llamacpp/bin:$PATH"
  fi
  # CPU only: no CUDA/Metal backends; GGML_NATIVE tunes the build to this machine's CPU.
  CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON -DGGML_CUDA=OFF -DLLAMA_CURL=OFF}" \
    .venv-llamacpp/bin/python -m pip install -q "llama-cpp-python[server]==$LLAMA_CPP_VERSION"
fi

.venv/bin/python -c "import ctranslate2, torch; print('ctranslate2', ctranslate2.__version__, '| torch', torch.__version__)"
.venv-llamacpp/bin/python -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
