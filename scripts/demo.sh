#!/usr/bin/env bash
# Install gem (scripts/setup.sh: the project's .venv unless an environment is active), then run
# the default recipe: GEM on the built-in synthetic data, offline. Extra arguments go to gem-run.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
exec "$GEM_BIN/gem-run" "$@"
