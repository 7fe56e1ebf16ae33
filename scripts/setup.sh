#!/usr/bin/env bash
# Install gem with its test extra into a Python environment and set GEM_BIN to that environment's
# bin folder (scripts/demo.sh and scripts/test.sh source this file).
#
# Which environment: an active virtual or conda environment is used as it is; otherwise the
# project's own .venv, made on first use with $PYTHON (default python3) and reused after. A venv
# works on a system Python that refuses pip installs (PEP 668, Debian 12, Ubuntu >= 23.04).
# torch 2.13.0 (CPU) is installed first and only when the environment has no torch, so pip never
# resolves a CUDA build on a machine without a GPU, and a GPU build you already have is kept
# (setup.cfg asks for torch>=2.1). A venv made here sees the system's site-packages, so a torch
# installed there counts too.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

say() { printf 'setup: %s\n' "$*" >&2; }

if [ -n "${VIRTUAL_ENV:-}" ]; then
  GEM_BIN="$VIRTUAL_ENV/bin"
  say "using the active virtual environment $VIRTUAL_ENV"
elif [ -n "${CONDA_PREFIX:-}" ]; then
  GEM_BIN="$CONDA_PREFIX/bin"
  say "using the active conda environment $CONDA_PREFIX"
else
  venv="${GEM_VENV:-.venv}"
  if [ ! -x "$venv/bin/python" ]; then
    base="${PYTHON:-python3}"
    say "creating the virtual environment $venv with $base ($("$base" --version 2>&1))"
    if ! "$base" -m venv --system-site-packages "$venv"; then
      rm -rf "$venv"
      say "error: '$base -m venv' failed. On Debian or Ubuntu install the venv module"
      say "       (sudo apt install python3-venv), or set PYTHON to another Python >= 3.10."
      exit 1
    fi
  fi
  GEM_BIN="$(cd "$venv/bin" && pwd)"
fi
py="$GEM_BIN/python"
[ -x "$py" ] || py="$GEM_BIN/python3"

# Reinstalling an unchanged project takes half a minute; skip it when setup.cfg is what was installed.
stamp="$("$py" -c 'import sys; print(sys.prefix)')/.gem-setup"
wanted="$(cat setup.cfg scripts/setup.sh | cksum)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ] && "$py" -c "import gem, torch" 2>/dev/null; then
  say "gem is installed in $GEM_BIN (setup.cfg unchanged)"
else
  if ! "$py" -c "import torch" 2>/dev/null; then
    say "[1/2] installing torch 2.13.0, CPU build (about 200 MB; 1-2 minutes)"
    "$py" -m pip install --progress-bar off "torch==2.13.0"
  else
    say "[1/2] torch $("$py" -c 'import torch; print(torch.__version__)') is installed; keeping it"
  fi
  say "[2/2] installing gem and its dependencies (2-4 minutes on 2 cores the first time)"
  "$py" -m pip install --progress-bar off -e ".[test]" 2>&1 | { grep -v "^Requirement already satisfied" || true; } >&2
  echo "$wanted" > "$stamp"
  say "done: gem is installed in $GEM_BIN"
fi
export GEM_BIN
