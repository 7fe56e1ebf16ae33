#!/usr/bin/env bash
# Install everything needed, then run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# `pytest`, not `python -m pytest`: the latter puts the repo root on sys.path, where core/ and
# hooks/ could be imported a second time under the wrong names.
exec pytest -q "$@"
