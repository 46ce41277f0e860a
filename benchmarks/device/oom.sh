#!/usr/bin/env bash
# Device-tool proof that a real CUDA out-of-memory ends in orch's plan-vs-actual message
# (exit code 5), not a raw traceback. A 1B QLoRA job with a micro batch far over the GPU.
#   usage (through the device tool, carry .whl):  bash benchmarks/device/oom.sh
set -uo pipefail
source benchmarks/device/env.sh
python3 - <<'PY'
import json, random
rng = random.Random(0)
words = ["alpha", "beta", "gamma", "delta", "memory", "tensor", "layer", "token"]
with open("/tmp/oom.jsonl", "w") as f:
    for _ in range(40000):
        f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(60))}) + "\n")
PY
python3 -m orchestrator.train --job jobs/tiny.yaml name=oom-proof strategy=single_gpu model.name=llama3-1b model.dtype=bf16 \
    quantization.compute_dtype=bf16 'data.paths=[/tmp/oom.jsonl]' data.seq_len=4096 \
    training.micro_batch_size=64 training.global_batch_size=64 training.gradient_checkpointing=false \
    training.max_steps=2 training.output_dir=/tmp/oom-out hardware.gpu_memory_gb=79.6 >"$OUT/oom.log" 2>&1
rc=$?
echo "exit code: $rc" | tee -a "$OUT/oom.log"
tail -5 "$OUT/oom.log"
