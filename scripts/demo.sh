#!/usr/bin/env bash
# The README's first command: install, then run the main job on the embedded default.
#   1. `orch plan` of the headline 70B job (no torch import, no download);
#   2. a real training run of jobs/tiny.yaml on this machine (CPU when there is no GPU)
#      through the same launcher path (orch's launcher) that Slurm jobs use.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
echo "+ orch plan jobs/llama70b.yaml"
orch plan jobs/llama70b.yaml
echo
# --out runs/demo: the compiled files go under the git-ignored runs/, so the demo leaves
# the committed examples in ds_configs/ and slurm/ (compiled with --portable) untouched.
# --restart: a second demo trains afresh; the run before is kept in runs/tiny/previous/.
echo "+ orch submit jobs/tiny.yaml --local --out runs/demo --restart"
orch submit jobs/tiny.yaml --local --out runs/demo --restart "$@"
