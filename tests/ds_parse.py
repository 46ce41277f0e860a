"""Load DeepSpeed JSON files with DeepSpeed's own parser (run as a subprocess by the tests).

argv[1]: JSON list of [path, world_size]. Prints one JSON object: path -> parsed values or error.

DeepSpeedConfig asks torch.distributed for the rank and, given an `mpu`, the
data-parallel world size from mpu.get_data_parallel_world_size(). Without an
initialized process group it silently falls back to world size 1, so this
script starts a real 1-process gloo group (so get_rank() works) and passes a
minimal mpu that reports the world size the file was generated for; DeepSpeed
then runs its own batch assertion (train_batch_size == micro x accumulation x
world) and its pydantic validation of every block.
"""

import json
import os
import sys

os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=str(29000 + os.getpid() % 1000))

import deepspeed  # noqa: E402
from deepspeed.runtime.config import DeepSpeedConfig  # noqa: E402

from orchestrator import jit_ops  # noqa: E402


class DataParallelGroup:
    """The one method DeepSpeedConfig calls on an mpu."""

    def __init__(self, world: int):
        self.world = world

    def get_data_parallel_world_size(self) -> int:
        return self.world


jit_ops.disable_shm_comm()  # as the trainer does (see orchestrator/jit_ops.py)
deepspeed.init_distributed(dist_backend="gloo", verbose=False)
out = {}
for path, world in json.loads(sys.argv[1]):
    try:
        c = DeepSpeedConfig(path, mpu=DataParallelGroup(world))
    except Exception as exc:  # noqa: BLE001 - reported to the test per file
        out[path] = {"error": f"{type(exc).__name__}: {exc}"}
        continue
    z = c.zero_config
    out[path] = {
        "world_size": c.world_size, "train_batch_size": c.train_batch_size,
        "micro": c.train_micro_batch_size_per_gpu, "accum": c.gradient_accumulation_steps,
        "stage": int(z.stage),
        "offload_optimizer": str(z.offload_optimizer.device) if z.offload_optimizer else "none",
        "offload_param": str(z.offload_param.device) if z.offload_param else "none",
        "bf16": bool(c.bfloat16_config.enabled), "fp16": bool(c.float16_config.enabled),
        "gradient_clipping": c.gradient_clipping, "wandb": bool(c.monitor_config.wandb.enabled),
        "max_live_parameters": int(z.max_live_parameters), "prefetch_bucket_size": int(z.prefetch_bucket_size),
        "reduce_bucket_size": int(z.reduce_bucket_size),
    }
print(json.dumps(out))
