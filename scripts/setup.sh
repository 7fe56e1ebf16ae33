#!/usr/bin/env bash
# Install gem and its dependencies. torch is installed first and pinned to the CPU build here,
# so pip never resolves a CUDA build of torch on a machine without a GPU; GPU users who already
# have torch keep theirs (setup.cfg only asks for torch>=2.1).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet -e ".[test]"
