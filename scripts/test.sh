#!/usr/bin/env bash
# The README's second command (and what CI runs): install, then the whole test suite.
# Tests that need Slurm start the local cluster themselves (scripts/local-slurm.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
exec .venv/bin/python -m pytest "$@"
