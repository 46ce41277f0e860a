#!/usr/bin/env bash
# Two-GPU validation of the sharded QLoRA ZeRO-3 load (issue 14 part 1): load peak and training peak per rank
# of Llama 3 8B and Llama 3.1 70B QLoRA under ZeRO-3 (memory_accuracy configs qlora-8b-zero3 and
# qlora-70b-zero3-s2048: random weights, bf16 storage of the packed 4-bit weights), next to the memory model.
#
# NOT RUN YET: written when only 1-GPU machines were lent (2026-11-24); it needs a machine with 2 GPUs
# (device tool kind nvidia-h200-x2). Run one config per call (a call is at most 10 minutes; the 70B build
# alone takes minutes):
#   bash benchmarks/device/qlora_zero3_2gpu.sh qlora-8b-zero3          (carry .whl; see env.sh)
#   bash benchmarks/device/qlora_zero3_2gpu.sh qlora-70b-zero3-s2048
# Each call leaves in $OUT the memory_accuracy result (json + md, log) and the per-rank table of
# benchmarks/device/qlora_zero3_check.py: 4-bit bytes each rank held right after the build over half the
# model's (1.00 when sharded), build peak against memory.build_peak_bytes and the old whole-model floor,
# load peak and training peak against memory.estimate. Copy them to benchmarks/results/device/ and put the
# measured load peaks in the README's memory table next to the predicted ones.
# Exit status: memory_accuracy's, or 1 from the check when a rank was not sharded after the build.
set -uo pipefail
source benchmarks/device/env.sh
config="${1:?usage: qlora_zero3_2gpu.sh qlora-8b-zero3|qlora-70b-zero3-s2048}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
if [ "$gpus" -lt 2 ]; then
    echo "this machine has $gpus GPU(s); the qlora ZeRO-3 configs need 2" >&2
    exit 2
fi
python3 benchmarks/memory_accuracy.py --only "$config" --timeout "${TIMEOUT:-540}" --out "$OUT/qlora_zero3_$config.json" \
    2>&1 | tee "$OUT/qlora_zero3_$config.log" | tail -20
rc=${PIPESTATUS[0]}
python3 benchmarks/device/qlora_zero3_check.py "$OUT/qlora_zero3_$config.json" 2>&1 | tee "$OUT/qlora_zero3_$config.check.txt"
check=${PIPESTATUS[0]}
[ "$rc" -ne 0 ] && exit "$rc"
exit "$check"
