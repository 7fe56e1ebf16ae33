#!/usr/bin/env bash
# Install gem with its test extra (scripts/setup.sh: the project's .venv unless an environment is
# active), then run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
# `pytest`, not `python -m pytest`: the latter puts the repo root on sys.path, where core/ and
# hooks/ could be imported a second time under the wrong names.
exec "$GEM_BIN/pytest" -q "$@"
