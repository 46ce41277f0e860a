"""Helpers to run jobs on the tests' local Slurm cluster (the `slurm_env` fixture in conftest.py starts it)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


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


def sbatch(script: Path, env: dict, cwd: Path, *script_args: str) -> str:
    proc = subprocess.run(["sbatch", "--parsable", str(script), *script_args], capture_output=True, text=True, env=env,
                          cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]
