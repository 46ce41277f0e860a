"""`orch submit` / `status` / `logs` / `cancel` against the real local Slurm cluster
(works without the trainer: the job's setup line keeps it running until cancelled)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests._slurm import REPO, wait_for_job

pytestmark = pytest.mark.slurm


def orch(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=120)


def test_submit_status_logs_cancel(slurm_env, tmp_path):
    proc = orch(["submit", "jobs/tiny.yaml", "strategy=zero2", "hardware.nodes=2", f"training.output_dir={tmp_path}/run",
                 "slurm.setup=[echo setup-ran, sleep 120]", "--out", str(tmp_path)], slurm_env)
    assert proc.returncode == 0, proc.stderr
    job_id = re.fullmatch(r"submitted job (\d+)\nlog: (.+)\n", proc.stdout).group(1)
    log = Path(re.search(r"log: (.+)", proc.stdout).group(1))
    assert log == tmp_path / "run" / "logs" / f"tiny-{job_id}.log"
    deadline = time.monotonic() + 60
    while not (log.exists() and "setup-ran" in log.read_text()):
        assert time.monotonic() < deadline, "job did not start"
        time.sleep(0.3)
    status = orch(["status", job_id], slurm_env)
    assert status.returncode == 0 and re.search(rf"\b{job_id}\b.*\btiny\b.*RUNNING", status.stdout), status.stdout
    shown = orch(["logs", job_id], slurm_env)
    assert shown.returncode == 0 and "setup-ran" in shown.stdout
    cancelled = orch(["cancel", job_id], slurm_env)
    assert cancelled.returncode == 0 and cancelled.stdout == f"cancelled {job_id}\n"
    assert wait_for_job(job_id, slurm_env, timeout=60) == "CANCELLED"


def test_sbatch_rejection_is_one_line_exit_4(slurm_env, tmp_path):
    proc = orch(["submit", "jobs/tiny.yaml", "strategy=single_gpu", "slurm.partition=nope",
                 f"training.output_dir={tmp_path}/run", "--out", str(tmp_path)], slurm_env)
    assert proc.returncode == 4
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("orch: error: sbatch failed:") and "partition" in lines[0], proc.stderr


def test_cancel_unknown_job_is_an_error(slurm_env):
    proc = orch(["cancel", "999999"], slurm_env)
    assert proc.returncode == 4
    assert proc.stderr.strip().startswith("orch: error: scontrol failed:")
