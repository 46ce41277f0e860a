"""Multi-node launch on the real local Slurm cluster: sbatch -> srun (one task per node)
-> orch's launcher (node rank, rendezvous) -> ranks doing a real gloo all-reduce.

The ranks run tests/launch_probe.py instead of orchestrator.train; everything else is the
generated script as is. The probe writes down what each rank saw (rank, local rank, SLURM_NODEID,
MASTER_ADDR/PORT, argv, NCCL_NVLS_ENABLE, whether and when SIGUSR1 came), which the trainer does
not report, and it starts 4 ranks in seconds on this 2-core machine. The real trainer on the same
path is tests/test_slurm_e2e.py (2 nodes training to the last step; USR1 -> checkpoint -> requeue
-> resume).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests._slurm import REPO, sbatch, wait_for_job
from orchestrator import compiler
from orchestrator.errors import Exit
from orchestrator.slurm import render_sbatch
from orchestrator.spec import load_job

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def compile_with_probe(tmp_path: Path, overrides: list[str]) -> tuple[compiler.Compiled, Path]:
    job = load_job(REPO / "jobs" / "tiny.yaml", [f"training.output_dir={tmp_path}/run", *overrides], check_paths=False)
    compiled = compiler.build(job, tmp_path / "out")
    compiler.write(compiled)
    probe_dir = tmp_path / "probe_pkg"
    probe_dir.mkdir()
    shutil.copy(REPO / "tests" / "launch_probe.py", probe_dir / "_orch_launch_probe.py")
    paths = dataclasses.replace(compiled.paths, module="_orch_launch_probe")
    script = tmp_path / "probe.sbatch"
    script.write_text(render_sbatch(compiled.job, compiled.strategy, paths))
    Path(paths.log_dir).mkdir(parents=True, exist_ok=True)
    return compiled, script


def probe_env(env: dict, tmp_path: Path) -> dict:
    env = dict(env)
    env["PYTHONPATH"] = f"{env['PYTHONPATH']}:{tmp_path / 'probe_pkg'}"
    return env


def read_ranks(run_dir: Path, restart: int) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run_dir / "probe").glob(f"run{restart}-rank*.json"))]


def test_two_nodes_two_ranks_each_allreduce(slurm_env, tmp_path):
    compiled, script = compile_with_probe(
        tmp_path, ["strategy=zero2", "hardware.nodes=2", "hardware.gpus_per_node=2", "training.global_batch_size=16"])
    env = probe_env(slurm_env, tmp_path)
    job_id = sbatch(script, env, tmp_path)
    state = wait_for_job(job_id, env, timeout=240)
    log = (Path(compiled.paths.log_dir) / f"tiny-{job_id}.log").read_text()
    assert state == "COMPLETED", log[-4000:]
    ranks = read_ranks(tmp_path / "run", 0)
    # 2 nodes x 2 GPUs = world 4; sum over ranks of (rank + 1) = 1+2+3+4 = 10.
    assert [r["rank"] for r in ranks] == [0, 1, 2, 3]
    assert {r["world_size"] for r in ranks} == {4}
    assert {r["allreduce_sum"] for r in ranks} == {10.0}
    # node_rank from SLURM_NODEID: ranks 0,1 on node 0 and 2,3 on node 1.
    assert [(r["node_id"], r["local_rank"]) for r in ranks] == [("0", 0), ("0", 1), ("1", 0), ("1", 1)]
    assert {r["master_addr"] for r in ranks} == {"n1"}  # first host of scontrol show hostnames
    assert {r["master_port"] for r in ranks} == {str(20000 + int(job_id) % 20000)}
    assert {r["nccl_nvls_enable"] for r in ranks} == {"0"}
    assert all(r["resume"] is False for r in ranks)
    assert all(r["argv"][-4:] == ["--job", compiled.paths.job_yaml, "--ds-config", compiled.paths.ds_config] for r in ranks)
    assert "ssh" not in script.read_text()


def test_usr1_reaches_ranks_and_exit_requeue_requeues(slurm_env, tmp_path):
    """Slurm's pre-timeout USR1 (sent here at once with scancel --batch) -> batch trap -> srun -> ranks;
    the launchers pass it on; ranks exiting Exit.REQUEUE make the job requeue and the rerun gets --resume.
    The script's argument (--restart, as `orch submit --restart` passes it) reaches the first run only.
    The probe writes no checkpoint (test_slurm_e2e.py shows the trainer's)."""
    compiled, script = compile_with_probe(tmp_path, ["strategy=zero2", "hardware.nodes=2"])
    env = probe_env(slurm_env, tmp_path)
    env["ORCH_PROBE_WAIT_USR1"] = "1"
    job_id = sbatch(script, env, tmp_path, "--restart")  # what `orch submit --restart` passes
    run = tmp_path / "run"
    deadline = time.monotonic() + 180
    while len(read_ranks(run, 0)) < 2:
        assert time.monotonic() < deadline, "ranks did not start"
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True, env=env)
    deadline = time.monotonic() + 240
    while len(read_ranks(run, 1)) < 2:
        assert time.monotonic() < deadline, "requeued run did not start"
        time.sleep(0.5)
    state = wait_for_job(job_id, env, timeout=120)
    log = (Path(compiled.paths.log_dir) / f"tiny-{job_id}.log").read_text()
    assert state == "COMPLETED", log[-4000:]
    # each rank got USR1, was still alive a second later (its launcher did not die of it) and exited REQUEUE
    for rank in (0, 1):
        assert (run / "probe" / f"usr1-rank{rank}").read_text() == f"exit {int(Exit.REQUEUE)}"
    # the batch shell saw USR1, found the requeue mark the node tasks left for that exit code, and requeued
    assert f"(USR1 received: 1); requeueing job {job_id}" in log, log[-4000:]
    assert "restart 1" in log, log[-4000:]
    # the script's argument reached the first run's ranks; the requeued run resumes instead
    assert all(r["argv"][-1] == "--restart" and r["resume"] is False for r in read_ranks(run, 0))
    assert all(r["resume"] is True and "--resume" in r["argv"] and "--restart" not in r["argv"] for r in read_ranks(run, 1))
