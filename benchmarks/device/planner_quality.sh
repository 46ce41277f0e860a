#!/usr/bin/env bash
# Device-tool run of the planner-quality benchmark: every feasible strategy of each job, timed.
#   usage (through the device tool, carry .whl):  bash benchmarks/device/planner_quality.sh [JOB[,JOB...]]
# Results land in $OUT (json + md + log); copy them to benchmarks/results/device/.
set -uo pipefail
source benchmarks/device/env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 benchmarks/planner_quality.py ${1:+--only "$1"} --steps "${STEPS:-8}" --timeout "${TIMEOUT:-120}" \
  --out "$OUT/planner_quality.json" 2>&1 | tee "$OUT/planner_quality.log" | tail -40
