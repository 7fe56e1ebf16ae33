#!/usr/bin/env bash
# Install everything needed, then run the default recipe (GEM on the synthetic data, offline).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec gem-run "$@"
