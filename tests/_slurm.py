"""The local Slurm cluster for tests (scripts/local-slurm.sh), and helpers to run jobs on it.

Import the fixture into a test module: ``from _slurm import slurm_env  # noqa: F401``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "local-slurm.sh"


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
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"local-slurm.sh failed:\n{proc.stderr[-3000:]}"
    conf = proc.stdout.strip().splitlines()[-1].removeprefix("SLURM_CONF=")
    env = dict(os.environ)
    env["SLURM_CONF"] = conf
    # Jobs inherit this environment (sbatch --export=ALL): the worktree's orch wins over
    # the venv's editable install.
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def wait_for_job(job_id: str, env: dict, timeout: float) -> str:
    """Poll until the job has left the queue; return its final state (scontrol keeps it MinJobAge s)."""
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, env=env).stdout
        state = next((tok.split("=", 1)[1] for tok in out.split() if tok.startswith("JobState=")), "")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"):
            return state
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], env=env)
    raise AssertionError(f"job {job_id} still {state or 'unknown'} after {timeout} s")


def sbatch(script: Path, env: dict, cwd: Path) -> str:
    proc = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, env=env, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]
