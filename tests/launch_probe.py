"""A stand-in for the trainer under orch's launcher (tests only).

Run as ``python -m _orch_launch_probe --job JOB.yaml --ds-config X.json [--resume|--restart] [--local_rank=N]``,
exactly like orchestrator.train. It does a real torch.distributed gloo
all-reduce over all ranks and writes what it saw to
``<training.output_dir>/probe/run<restart>-rank<r>.json``. With
ORCH_PROBE_WAIT_USR1=1 (and no --resume) it waits for SIGUSR1 like a trainer
waiting for a step boundary, then writes ``usr1-rank<r>`` (the exit code it is about to return) and
exits with Exit.REQUEUE as the trainer does after its checkpoint; it writes no checkpoint.
"""

import argparse
import json
import os
import signal
import socket
import sys
import time

import yaml

from orchestrator.errors import Exit


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--job", required=True)
    p.add_argument("--ds-config", required=True)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--restart", action="store_true")
    p.add_argument("--local_rank", type=int, default=None)
    args = p.parse_args()

    got_usr1 = []
    signal.signal(signal.SIGUSR1, lambda *_: got_usr1.append(time.time()))

    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    job = yaml.safe_load(open(args.job))
    ds = json.load(open(args.ds_config))
    out = os.path.join(job["training"]["output_dir"], "probe")
    os.makedirs(out, exist_ok=True)
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    info = {
        "rank": rank, "world_size": world, "local_rank": int(os.environ["LOCAL_RANK"]),
        "allreduce_sum": t.item(), "node_id": os.environ.get("SLURM_NODEID"),
        "host": socket.gethostname(), "master_addr": os.environ.get("MASTER_ADDR"),
        "master_port": os.environ.get("MASTER_PORT"), "resume": args.resume, "job_name": job["name"],
        "train_batch_size": ds["train_batch_size"], "argv": sys.argv[1:],
        "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE"),
    }
    with open(os.path.join(out, f"run{restart}-rank{rank}.json"), "w") as f:
        json.dump(info, f)
    code = Exit.OK
    if os.environ.get("ORCH_PROBE_WAIT_USR1") == "1" and not args.resume:
        deadline = time.time() + 120
        while not got_usr1 and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # still alive a moment later: the launcher above us did not die of USR1
        # Like the trainer: REQUEUE = "stopped on SIGUSR1 (after a checkpoint, for the trainer), requeue me".
        code = Exit.REQUEUE if got_usr1 else Exit.OK
        with open(os.path.join(out, f"usr1-rank{rank}"), "w") as f:
            f.write(f"exit {int(code)}")
    dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
