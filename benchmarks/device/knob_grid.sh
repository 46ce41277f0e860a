#!/usr/bin/env bash
# Device-tool run of the auto-knob validation (benchmarks/knob_grid.py): ONE job per call, its whole grid in one
# process (the model is built and compiled once; each point recompiles the layers for its shapes). `--list` on
# any machine shows each job's points and the planner's choice. Rough device time per call (not yet measured):
# qlora-8b-24gb and qlora-1b 4-6 min, lora-8b ~6 min, qlora-70b ~7 min with STEPS=2.
#   usage (through the device tool, carry .whl):  bash benchmarks/device/knob_grid.sh JOB [--points 8:on,1:on] [--all]
# Results land in $OUT (json + md + log); copy them to benchmarks/results/device/<call>/.
set -uo pipefail
source benchmarks/device/env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 benchmarks/knob_grid.py --job "$1" --steps "${STEPS:-3}" --warmup 1 "${@:2}" \
  --out "$OUT/knob_grid.json" 2>&1 | tee "$OUT/knob_grid.log" | tail -40
