"""DeepSpeed's just-in-time C++/CUDA ops, built or loaded before DeepSpeed asks for them.

DeepSpeed builds some ops on first use (``cpu_adam`` for an offloaded optimizer, ``fused_adam``
on a GPU; the CPU all-reduce ``deepspeed_shm_comm`` at every ``init_distributed`` on a CPU, which
orch turns off: disable_shm_comm). torch guards each build folder with a ``lock`` file that a
process creates and deletes; a process killed while it holds that file (a Slurm preemption, ``kill -9``, a test that stops
a run at start-up) leaves it behind, and from then on every run on the machine that shares
the folder (``~/.cache/torch_extensions`` by default) waits for it forever, silently, at 0 % CPU.
That is how one killed run hung a whole CI run.

Each Python environment gets its own build folder (``<sys.prefix>/torch_extensions``, unless
``TORCH_EXTENSIONS_DIR`` is set): builds of different environments (two orch checkouts, another
torch version) neither rebuild over each other nor meet each other's lock files.

Within one, orch loads these ops itself first, each under an advisory ``flock`` the kernel drops when
its holder dies: while orch holds it, no orch process is building, so a torch ``lock`` found
there is stale and is removed (with a line on stderr). Later loads by DeepSpeed hit the op
builder's per-process cache. A program other than orch is not coordinated with: it
shares the folder only if ``TORCH_EXTENSIONS_DIR`` points both at it.

Only the trainer imports this module (it imports deepspeed).
"""

from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path

from orchestrator.strategy import Strategy

SHM_COMM = "ShareMemCommBuilder"
CPU_ADAM = "CPUAdamBuilder"
FUSED_ADAM = "FusedAdamBuilder"
ASYNC_IO = "AsyncIOBuilder"


def disable_shm_comm() -> None:
    """Keep DeepSpeed from building and starting its CPU shared-memory all-reduce (call before
    ``deepspeed.init_distributed``).

    DeepSpeed builds it at every ``init_distributed`` on a CPU and uses it only for
    ``inference_all_reduce`` (tensor-parallel inference), never in training; each rank's start maps
    a 66 MB ``/dev/shm/deepspeed_allreduce_buffer_*`` that DeepSpeed never unlinks, so every CPU
    run left 66 MB of RAM per rank behind (a day of test runs filled a 24 GiB machine's /dev/shm),
    and its JIT build took minutes on a fresh machine. DeepSpeed skips an op its registry marks
    incompatible (``deepspeed.comm.torch.build_shm_op``).
    """
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


def optimizer_ops(strategy: Strategy, cuda: bool) -> list[str]:
    """The op builders DeepSpeed's engine loads for this strategy's optimizer, by class name."""
    if strategy.optimizer_offload == "none":
        return [FUSED_ADAM] if cuda else []
    return [CPU_ADAM, ASYNC_IO] if strategy.needs_nvme else [CPU_ADAM]


def load_ops(names: list[str]) -> list[str]:
    """Build or load each named op that this machine supports; return the names loaded."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(environment_build_root()))
    loaded = []
    for name in names:
        builder = get_accelerator().create_op_builder(name)
        if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
            continue
        build_dir = Path(_get_build_directory(builder.name, verbose=False))
        with _held(build_dir / "orch.flock"):
            remove_stale_lock(build_dir)
            builder.load(verbose=False)
        loaded.append(name)
    return loaded


def environment_build_root() -> Path:
    """This Python environment's folder for JIT-built ops (torch's default is one per user)."""
    root = Path(sys.prefix) / "torch_extensions"
    if os.access(sys.prefix, os.W_OK) or root.is_dir():
        return root
    return Path.home() / ".cache" / "torch_extensions" / Path(sys.prefix).name  # a read-only system Python


def remove_stale_lock(build_dir: Path) -> bool:
    """Delete torch's build lock in ``build_dir``; call only while holding its ``orch.flock``."""
    lock = build_dir / "lock"
    try:
        lock.unlink()
    except FileNotFoundError:
        return False
    print(f"orch: removed a stale build lock left by a killed process: {lock}", file=sys.stderr)
    return True


class _held:
    """``with _held(path):`` holds an exclusive flock on ``path`` (created if needed)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = -1

    def __enter__(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
