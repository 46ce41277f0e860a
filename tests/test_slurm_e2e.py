"""End to end: `orch submit` really trains on the local 2-node Slurm cluster, and
`orch submit --local` through orch's launcher on this machine.

What each rank of the launch saw (node, local rank, rendezvous, argv) is checked with a gloo
probe as the ranks in tests/test_slurm_launch.py and test_local_launch_runs_ranks_on_cpu below;
the trainer records none of it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests._slurm import REPO, wait_for_job
from orchestrator import compiler, submit
from orchestrator.errors import OrchError
from orchestrator.spec import load_job

def orch(args: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=timeout)


@pytest.mark.slurm
@pytest.mark.slow
def test_submit_tiny_two_nodes_trains_to_the_last_step(slurm_env, tmp_path):
    run = tmp_path / "run"
    env = dict(slurm_env, WANDB_MODE="offline")
    proc = orch(["submit", "jobs/tiny.yaml", "hardware.nodes=2", f"training.output_dir={run}", "--out", str(tmp_path)], env)
    assert proc.returncode == 0, proc.stderr
    job_id = re.search(r"submitted job (\d+)", proc.stdout).group(1)
    log = Path(re.search(r"log: (.+)", proc.stdout).group(1))
    state = wait_for_job(job_id, env, timeout=900)
    text = log.read_text()
    assert state == "COMPLETED", text[-5000:]
    # orch's launcher ran under srun on both nodes (each logs the ranks it starts).
    assert "orch launch: node 0 of 2: ranks 0-0 of 2" in text and "orch launch: node 1 of 2: ranks 1-1 of 2" in text, \
        text[-5000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["world_size"] == 2  # tiny.yaml: max_steps 30; 2 nodes x 1 GPU
    steps = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert {s["rank"] for s in steps if s["step"] == 30} == {0, 1}  # both ranks reached the last step
    checkpoints = [p for p in (run / "checkpoints").iterdir() if p.is_dir()]
    assert checkpoints, "no checkpoint written"
    assert (run / "adapter").is_dir()
    # orch logs finds the same log through Slurm.
    shown = orch(["logs", job_id], env)
    assert shown.returncode == 0 and shown.stdout == text


@pytest.mark.slow
def test_submit_local_tiny_two_cpu_processes(tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO), WANDB_MODE="offline")
    proc = orch(["submit", "jobs/tiny.yaml", "strategy=zero2", "hardware.gpus_per_node=2", "training.max_steps=4",
                 "training.save_every=0", f"training.output_dir={run}", "--local", "--out", str(tmp_path)], env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["world_size"] == 2


@pytest.mark.slow
def test_local_launch_runs_ranks_on_cpu(tmp_path, monkeypatch):
    """`--local`'s launch (orch's launcher, gpus_per_node ranks, no CUDA here -> CPU processes) with
    the gloo probe as the ranks."""
    monkeypatch.chdir(REPO)
    job = load_job("jobs/tiny.yaml", ["strategy=zero2", "hardware.gpus_per_node=2", f"training.output_dir={tmp_path}/run"])
    compiled = compiler.build(job, tmp_path / "out")
    probe_dir = tmp_path / "probe_pkg"
    probe_dir.mkdir()
    shutil.copy(REPO / "tests" / "launch_probe.py", probe_dir / "_orch_launch_probe.py")
    compiled = dataclasses.replace(compiled, paths=dataclasses.replace(compiled.paths, module="_orch_launch_probe"))
    monkeypatch.setenv("PYTHONPATH", f"{REPO}:{probe_dir}")
    assert submit.run_local(compiled, submit.SubmitOptions(local=True)) == 0
    ranks = [json.loads(p.read_text()) for p in sorted((tmp_path / "run" / "probe").glob("run0-rank*.json"))]
    assert [(r["rank"], r["local_rank"], r["world_size"]) for r in ranks] == [(0, 0, 2), (1, 1, 2)]
    assert {r["allreduce_sum"] for r in ranks} == {3.0}
    assert (tmp_path / "out" / "slurm" / "tiny.job.yaml").exists()  # --local compiles first


def test_local_refuses_multi_node(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    job = load_job("jobs/tiny.yaml", ["strategy=zero2", "hardware.nodes=2"])
    with pytest.raises(OrchError, match="hardware.nodes=1"):
        submit.run_local(compiler.build(job, tmp_path), submit.SubmitOptions(local=True))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slurm
@pytest.mark.slow
def test_usr1_checkpoints_requeues_and_resumes_the_trainer(slurm_env, tmp_path):
    """Slurm's pre-timeout signal (sent at once here: scancel --signal=USR1 --batch) makes the
    trainer checkpoint and exit; the job requeues, resumes with --resume and finishes all steps."""
    import time

    run = tmp_path / "run"
    env = dict(slurm_env, WANDB_MODE="offline")
    proc = orch(["submit", "jobs/tiny.yaml", "hardware.nodes=2", "training.max_steps=200", "training.save_every=0",
                 f"training.output_dir={run}", "--out", str(tmp_path)], env)
    assert proc.returncode == 0, proc.stderr
    job_id = re.search(r"submitted job (\d+)", proc.stdout).group(1)
    log = Path(re.search(r"log: (.+)", proc.stdout).group(1))
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while not (metrics.exists() and metrics.read_text().count("\n") >= 4):
        assert time.monotonic() < deadline, "trainer did not start logging"
        time.sleep(1)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True, env=env)
    state = wait_for_job(job_id, env, timeout=900)
    text = log.read_text()
    assert state == "COMPLETED", text[-5000:]
    assert "checkpoint written (USR1 received: 1); requeueing job" in text and "restart 1" in text, text[-5000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 200
    steps = [json.loads(l)["step"] for l in metrics.read_text().splitlines()]
    assert max(steps) == 200 and steps.count(1) <= 2  # resumed: step 1 logged once per rank, not again
