"""Multi-node launch on the real local Slurm cluster: sbatch -> srun (one task per node)
-> deepspeed launcher (--no_ssh, hostfile, node_rank) -> ranks doing a real gloo all-reduce.

The ranks run tests/launch_probe.py instead of orchestrator.train (which lives in
another branch until merged); everything else is the generated script as is.
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
    assert "ssh" not in script.read_text().replace("--no_ssh", "")


def test_usr1_checkpoint_signal_reaches_ranks_and_requeues(slurm_env, tmp_path):
    """Slurm's pre-timeout USR1 (sent here at once with scancel --batch) -> batch trap -> srun -> ranks;
    the launchers ignore it; the job requeues and the rerun gets --resume."""
    compiled, script = compile_with_probe(tmp_path, ["strategy=zero2", "hardware.nodes=2"])
    env = probe_env(slurm_env, tmp_path)
    env["ORCH_PROBE_WAIT_USR1"] = "1"
    job_id = sbatch(script, env, tmp_path)
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
    assert (run / "probe" / "usr1-rank0").read_text() == "True"
    assert (run / "probe" / "usr1-rank1").read_text() == "True"
    assert "checkpoint written (USR1 received: 1); requeueing job" in log, log[-4000:]
    assert all(r["resume"] is True and "--resume" in r["argv"] for r in read_ranks(run, 1))
