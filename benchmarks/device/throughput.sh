#!/usr/bin/env bash
# Device-tool run of the throughput benchmark (orch vs HF Trainer + PEFT), a subset per call:
# one call is at most 10 minutes, and each case runs three 8B trainings (orch, HF, HF + flags; liger-kernel
# installs from .whl when its wheel is there).
#   usage (through the device tool, carry .whl):  bash benchmarks/device/throughput.sh CASE[,CASE...]
# Results land in $OUT (json + md + log); copy them to benchmarks/results/device/.
set -uo pipefail
source benchmarks/device/env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 benchmarks/throughput.py --only "$1" --steps "${STEPS:-12}" --timeout "${TIMEOUT:-270}" \
  --out "$OUT/throughput.json" 2>&1 | tee "$OUT/throughput.log" | tail -40
