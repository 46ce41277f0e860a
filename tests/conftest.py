"""Fixtures shared by several test files (pytest finds them here; no imports needed)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["portable", "avx512bf16"])
def bnb_cpu_path(request, monkeypatch):
    """Run the test once as on a CPU without AVX512-BF16 and once as on one with it.

    bitsandbytes reads the CPU's AVX512-BF16 flag (``has_avx512bf16``) when a Linear4bit is
    constructed and, when set, switches eval-mode CPU forwards to a packed weight layout. The
    flag is patched where ``bitsandbytes.nn.modules`` looks it up, so both sides run on any
    machine. Yields the side's name.
    """
    modules = pytest.importorskip("bitsandbytes.nn.modules")
    monkeypatch.setattr(modules, "has_avx512bf16", lambda: request.param == "avx512bf16")
    yield request.param


def _can_be_root() -> bool:
    if os.geteuid() == 0:
        return True
    return shutil.which("sudo") is not None and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0


@pytest.fixture(scope="session")
def slurm_env() -> dict[str, str]:
    """Start (idempotently) the 2-node local cluster; the environment for sbatch/srun and orch.

    Skips only where the cluster cannot be set up: Slurm missing and no apt-get, or
    neither root nor passwordless sudo.
    """
    if not _can_be_root():
        pytest.skip("the local Slurm cluster needs root or passwordless sudo (scripts/local-slurm.sh)")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("Slurm is not installed and apt-get is unavailable to install it")
    proc = subprocess.run(["bash", str(REPO / "scripts" / "local-slurm.sh")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"local-slurm.sh failed:\n{proc.stderr[-3000:]}"
    conf = proc.stdout.strip().splitlines()[-1].removeprefix("SLURM_CONF=")
    env = dict(os.environ)
    env["SLURM_CONF"] = conf
    # Jobs inherit this environment (sbatch --export=ALL): the worktree's orch wins over
    # the venv's editable install.
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env
