#!/usr/bin/env bash
# Device-tool run of the memory-accuracy benchmark (a subset per call: one call is at most 10 minutes).
#   usage (through the device tool, carry .whl):  bash benchmarks/device/accuracy.sh CONFIG[,CONFIG...]
# Results land in $OUT (json + md + per-config logs); copy them to benchmarks/results/device/.
set -uo pipefail
source benchmarks/device/env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 benchmarks/memory_accuracy.py --only "$1" --timeout "${TIMEOUT:-300}" --out "$OUT/memory_accuracy.json" 2>&1 | tee "$OUT/accuracy.log" | tail -40
