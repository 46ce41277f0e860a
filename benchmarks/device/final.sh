#!/usr/bin/env bash
# Issue 16's last GPU measurements, one PART per device-tool call (carry .whl). Each part ends by itself within
# BUDGET seconds (default 530: under 9 minutes, wheel install, model builds and compile warm-ups included): its
# benchmark runs under `timeout` for what is left of the budget, and whatever was written by then comes back in
# $OUT (both benchmarks rewrite their JSON + markdown after every case/point; the throughput parts also copy each
# side's raw files, so a side cut off mid-case is not lost with its row).
#
#   bash benchmarks/device/final.sh PART
#
# Parts, with the wall time estimated from the H100 numbers of 2026-11-24 (benchmarks/results/device/h100-call5:
# orch 8B, 10 steps, build + compile + steps took 51-71 s per run -- 71 s with a cold triton cache; the HF
# baseline 29-37 s per run in benchmarks/results/throughput.json; the wheel install ~20 s). "HF + flags" compiles
# the whole model with torch.compile, never measured here: assumed 2-2.5 min per run (dynamo through 32 layers,
# checkpointing and 4-bit linears). Step times: QLoRA mb4 8,192 tokens at ~9,900 tok/s orch / ~4,800 HF.
#   throughput-qlora      8B QLoRA mb4 then mb1, seq 2048, random weights, 10 steps (tok/s after step 3), each
#                         orch defaults vs HF defaults vs HF + flags (6 runs):
#                         2 x (~60 s orch + ~35 s HF + ~135 s flags) + 20 s ~ 8 min; tight if the whole-model
#                         compile is slower than assumed: then run the two halves below instead.
#   throughput-qlora-mb4  the mb4 half alone (3 runs) ~ 4 min
#   throughput-qlora-mb1  the mb1 half alone (3 runs) ~ 4 min
#   throughput-lora       8B LoRA mb1, the same three sides (3 runs) ~ 4 min
#   knobs                 the knob grid (benchmarks/knob_grid.py, 3 steps per point, 1 warm-up) on the 24 GiB
#                         example (under its 24 GiB cap; 6 points: 30 s build + per point ~15 s recompile for
#                         its shapes + 3 steps of 32,768 tokens at 6-11k tok/s) ~ 3.5 min, then QLoRA 1B
#                         (10 points, ~15-20 s each) ~ 3 min; ~ 7 min with the install. The 1B grid gets what is
#                         left of the budget (its points are saved as they finish).
#   knobs-24gb, knobs-1b  one job each, when `knobs` ran out of budget
#   knobs-70b, knobs-lora8b  the other two jobs, only if device time remains (70B: ~60 s to build + 5 points of
#                         ~1,000-1,400 tok/s, 2 steps each; LoRA 8B: 8 points): unestimated, each within BUDGET
#   profile               benchmarks/device/profile_step.py (issue 16 item 4): one optimizer step of 8B QLoRA mb4,
#                         old path (DeepSpeed, eager, sdpa) vs the defaults, one process each: ~45 s build +
#                         2 warm-up steps (+ ~20 s compile on the new path) + 1 profiled step ~ 3 min
#   tiny-throughput, tiny-knobs  the same plumbing on the CPU (tiny-llama, --tiny) for a dry run off the GPU:
#                         SKIP_ENV=1 PYTHON=.venv/bin/python OUT=/tmp/final bash benchmarks/device/final.sh tiny-knobs
# Copy $OUT to benchmarks/results/device/<call>/ afterwards.
set -uo pipefail
cd "$(dirname "$0")/../.."
PART=${1:-}
BUDGET=${BUDGET:-530}
PY=${PYTHON:-python3}
OUT=${OUT:?OUT: the folder the device tool returns}
mkdir -p "$OUT"

left() { echo $((BUDGET - SECONDS)); }  # SECONDS: bash's count since this script started

setup() {
  [ "${SKIP_ENV:-0}" = 1 ] || source benchmarks/device/env.sh
  if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; fi
}

# throughput CASES [--tiny]: orch vs HF vs HF + flags; then each side's raw files (job, summary, metrics, baseline
# JSONs; not the synthetic data, adapter or checkpoints) into $OUT/raw.
throughput() {
  local cases=$1; shift
  setup
  timeout -k 10 "$(left)" "$PY" benchmarks/throughput.py --only "$cases" --steps "${STEPS:-10}" \
    --warmup "${WARMUP:-3}" --timeout "${TIMEOUT:-300}" --out "$OUT/throughput_${PART}.json" "$@" 2>&1 \
    | tee "$OUT/throughput_${PART}.log" | tail -40
  local rc=${PIPESTATUS[0]}
  for c in ${cases//,/ }; do
    [ -d "runs/throughput/$c" ] || continue
    (cd runs/throughput && find "$c" \( -name data.jsonl -o -name adapter -o -name checkpoints -o -name data_cache \) \
      -prune -o -type f \( -name '*.json' -o -name '*.jsonl' -o -name '*.yaml' \) -print |
      while read -r f; do mkdir -p "$OUT/raw/$(dirname "$f")"; cp "$f" "$OUT/raw/$f"; done)
  done
  return "$rc"
}

# knobs JOB [--tiny ...]: one job's grid in one process, with what is left of the budget.
knobs() {
  local job=$1; shift
  local t; t=$(left)
  if [ "$t" -le 30 ]; then echo "knobs $job: skipped, ${t}s of the budget left"; return 0; fi
  timeout -k 10 "$t" "$PY" benchmarks/knob_grid.py --job "$job" --steps "${STEPS:-3}" --warmup 1 "$@" \
    --out "$OUT/knob_grid_${job}.json" 2>&1 | tee "$OUT/knob_grid_${job}.log" | tail -30
  return "${PIPESTATUS[0]}"
}

case "$PART" in
  throughput-qlora)     throughput qlora-8b-s2048-mb4,qlora-8b-s2048-mb1 ;;
  throughput-qlora-mb4) throughput qlora-8b-s2048-mb4 ;;
  throughput-qlora-mb1) throughput qlora-8b-s2048-mb1 ;;
  throughput-lora)      throughput lora-8b-s2048-mb1 ;;
  knobs)                setup; knobs qlora-8b-24gb; knobs qlora-1b ;;
  knobs-24gb)           setup; knobs qlora-8b-24gb ;;
  knobs-1b)             setup; knobs qlora-1b ;;
  knobs-70b)            setup; STEPS=${STEPS:-2} knobs qlora-70b ;;
  knobs-lora8b)         setup; knobs lora-8b ;;
  profile)
    if [ -f benchmarks/device/profile_step.py ]; then
      setup; timeout -k 10 "$(left)" "$PY" benchmarks/device/profile_step.py --timeout 240 --out "$OUT" 2>&1 | tee "$OUT/profile.log" | tail -40
    else
      echo "profile: benchmarks/device/profile_step.py is not in this tree (issue 16 item 4 not done); nothing to run"
    fi ;;
  tiny-throughput)      throughput tiny-lora-cpu --tiny ;;
  tiny-knobs)           setup; knobs tiny-qlora-cpu --tiny ;;
  *) echo "usage: final.sh PART; parts: throughput-qlora throughput-qlora-mb4 throughput-qlora-mb1 throughput-lora" \
       "knobs knobs-24gb knobs-1b knobs-70b knobs-lora8b profile tiny-throughput tiny-knobs" >&2; exit 2 ;;
esac
