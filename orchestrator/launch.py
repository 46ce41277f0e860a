"""orch's launcher: the trainer's ranks of one node, with stop signals passed on instead of kills.

    python -m orchestrator.launch --nproc-per-node G [--nnodes N --node-rank R]
        [--master-addr A --master-port P] [--module orchestrator.train] -- ARGS...

starts G processes ``python -u -m MODULE ARGS...``, each with the environment torch.distributed
and DeepSpeed read: RANK (= R x G + local rank), LOCAL_RANK, WORLD_SIZE (N x G), LOCAL_WORLD_SIZE,
MASTER_ADDR, MASTER_PORT, and DeepSpeed's LOCAL_SIZE, CROSS_RANK, CROSS_SIZE. CUDA_VISIBLE_DEVICES
is left as it is (Slurm's, or all GPUs): local rank i uses visible GPU i. `orch submit --local`
runs `launch` in its own process; the batch script runs one launcher per node (srun, one task each).

Why not DeepSpeed's launcher: on SIGTERM or SIGINT ``deepspeed.launcher.launch`` terminates every
rank (and everything they started), waits 30 s, kills, and exits 1. A rank never gets to write its
checkpoint after Slurm's SIGTERM, and the batch script never sees the rank's exit code 75.

Here:
* stop signals (SIGTERM, SIGINT, SIGUSR1; orchestrator/stop.py) are forwarded to every rank still
  running, and the launcher keeps waiting: each rank checkpoints at its next step boundary and
  exits 75. Nothing is killed on a timer: SIGKILL (Slurm's, after its KillWait) stays the hard stop.
* a rank that fails (any exit status but 0 and 75) ends the others with SIGKILL, as
  ``srun --kill-on-bad-exit`` does: they may be blocked in a collective with it.
* the exit status: 0 when every rank exited 0; 75 when each exited 0 or 75; else the first failing
  rank's (128 + N for a rank killed by signal N, as a shell reports it).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from orchestrator.errors import Exit
from orchestrator.stop import STOP_SIGNALS, signal_name


@dataclass(frozen=True)
class LaunchSpec:
    """The ranks of one node."""

    nproc_per_node: int
    """Ranks on this node (one per GPU)."""
    module: str = "orchestrator.train"
    """The Python module each rank runs (tests swap in a probe or tests.fault_trainer)."""
    args: tuple[str, ...] = ()
    """Its arguments."""
    nnodes: int = 1
    """Nodes in the job."""
    node_rank: int = 0
    """This node's index (SLURM_NODEID)."""
    master_addr: str = "127.0.0.1"
    """Host of rank 0 (the rendezvous)."""
    master_port: int = 29500
    """Port of the rendezvous on master_addr."""
    python: str = sys.executable
    """The interpreter the ranks run."""

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node


def rank_command(spec: LaunchSpec) -> list[str]:
    """What each rank runs (argv, no shell)."""
    return [spec.python, "-u", "-m", spec.module, *spec.args]


def rank_environment(spec: LaunchSpec, local_rank: int, base: Mapping[str, str]) -> dict[str, str]:
    """``base`` plus the rendezvous variables of local rank ``local_rank``."""
    env = dict(base)
    env.update({
        "RANK": str(spec.node_rank * spec.nproc_per_node + local_rank),
        "LOCAL_RANK": str(local_rank),
        "WORLD_SIZE": str(spec.world_size),
        "LOCAL_WORLD_SIZE": str(spec.nproc_per_node),
        "MASTER_ADDR": spec.master_addr,
        "MASTER_PORT": str(spec.master_port),
        # DeepSpeed's names (its CPU accelerator counts devices by LOCAL_SIZE)
        "LOCAL_SIZE": str(spec.nproc_per_node),
        "CROSS_RANK": str(spec.node_rank),
        "CROSS_SIZE": str(spec.nnodes),
    })
    return env


def exit_status(wait_status: int) -> int:
    """A child's exit status as a shell reports it (128 + N when killed by signal N)."""
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code


def combined_status(statuses: Sequence[int], first_failure: Optional[int]) -> int:
    """The launcher's exit status from its ranks' (see the module docstring)."""
    if first_failure is not None:
        return first_failure
    return Exit.REQUEUE if Exit.REQUEUE in statuses else Exit.OK


def launch(spec: LaunchSpec, base_env: Optional[Mapping[str, str]] = None) -> int:
    """Run the ranks of ``spec`` to the end; returns the combined exit status."""
    base = os.environ if base_env is None else base_env
    procs: dict[int, subprocess.Popen] = {}  # by pid, in local rank order
    said: set[int] = set()

    def forward(signum: int, frame=None) -> None:  # noqa: ARG001 - a signal handler's signature
        if signum not in said:
            said.add(signum)
            print(f"orch launch: {signal_name(signum)} received; asking {len(procs)} rank(s) to checkpoint and stop",
                  file=sys.stderr, flush=True)
        for proc in procs.values():
            if proc.returncode is None:
                try:
                    proc.send_signal(signum)
                except ProcessLookupError:
                    pass

    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    first = spec.node_rank * spec.nproc_per_node
    print(f"orch launch: node {spec.node_rank} of {spec.nnodes}: ranks {first}-{first + spec.nproc_per_node - 1} "
          f"of {spec.world_size}: {shlex.join(rank_command(spec))}", file=sys.stderr, flush=True)
    try:
        for local_rank in range(spec.nproc_per_node):
            proc = subprocess.Popen(rank_command(spec), env=rank_environment(spec, local_rank, base))
            procs[proc.pid] = proc
        statuses: list[int] = []
        first_failure: Optional[int] = None
        while len(statuses) < len(procs):
            pid, wait_status = os.wait()  # retried after a signal handler runs (PEP 475)
            proc = procs.get(pid)
            if proc is None:
                continue
            proc.returncode = status = exit_status(wait_status)
            statuses.append(status)
            if status not in (Exit.OK, Exit.REQUEUE) and first_failure is None:
                first_failure = status
                rank = first + list(procs).index(pid)
                print(f"orch launch: rank {rank} exited with status {status}; stopping the other ranks",
                      file=sys.stderr, flush=True)
                for other in procs.values():
                    if other.returncode is None:
                        other.kill()
        return combined_status(statuses, first_failure)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def parse(argv: Sequence[str]) -> LaunchSpec:
    """The launcher's command line: options, then ``--`` and the module's arguments."""
    argv = list(argv)
    own, rest = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(prog="python -m orchestrator.launch", description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc-per-node", type=int, required=True, help="ranks on this node (one per GPU)")
    p.add_argument("--nnodes", type=int, default=1, help="nodes in the job (default 1)")
    p.add_argument("--node-rank", type=int, default=0, help="this node's index (default 0)")
    p.add_argument("--master-addr", default="127.0.0.1", help="host of rank 0 (default 127.0.0.1)")
    p.add_argument("--master-port", type=int, default=29500, help="rendezvous port (default 29500)")
    p.add_argument("--module", default="orchestrator.train", help="module each rank runs (default orchestrator.train)")
    args = p.parse_args(own)
    if args.nproc_per_node < 1 or args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes:
        p.error("need --nproc-per-node >= 1, --nnodes >= 1 and 0 <= --node-rank < --nnodes")
    return LaunchSpec(nproc_per_node=args.nproc_per_node, module=args.module, args=tuple(rest), nnodes=args.nnodes,
                      node_rank=args.node_rank, master_addr=args.master_addr, master_port=args.master_port)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return launch(parse(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
