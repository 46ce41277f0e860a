"""Hostile text in a spec (job name, paths, setup lines with spaces, quotes, $(), backticks, ;)
goes through the generated script as data: real bash parses it, real sbatch submits it, the
2-node job runs on the local cluster, and no injected command runs (marker files checked)."""

from __future__ import annotations

import dataclasses
import json
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests._slurm import REPO, sbatch, wait_for_job
from orchestrator import compiler
from orchestrator.slurm import render_sbatch
from orchestrator.spec import load_job

HOSTILE = "a b 'q' \"dq\" $(touch PWNED1) `touch PWNED2`; touch PWNED3 & x%jy"


def markers(*roots: Path) -> list[Path]:
    return [p for root in roots for p in root.rglob("PWNED*")]


def hostile_job(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / HOSTILE  # a directory whose name is the hostile text
    root.mkdir()
    shutil.copy(REPO / "jobs" / "data" / "tiny.jsonl", root / "data.jsonl")
    spec = yaml.safe_load((REPO / "jobs" / "tiny.yaml").read_text())
    spec["name"] = HOSTILE
    spec["data"]["paths"] = [str(root / "data.jsonl")]
    spec["training"]["output_dir"] = str(root / "run {name}")
    spec["strategy"] = "zero2"
    spec["hardware"]["nodes"] = 2
    spec["slurm"]["setup"] = [
        # Setup lines run as written (trusted), exactly once: the quoted text stays literal.
        f"echo 'literal $(touch PWNED4) `touch PWNED5`; touch PWNED6' > {shlex.quote(str(root / 'setup.out'))}",
        "export ORCH_TEST_GREETING=\"hello; \\$(touch PWNED7)\"",
    ]
    job_file = root / "job.yaml"
    job_file.write_text(yaml.safe_dump(spec))
    return job_file, root


@pytest.mark.slurm
@pytest.mark.slow
def test_hostile_spec_submits_and_runs_without_injection(slurm_env, tmp_path):
    job_file, root = hostile_job(tmp_path)
    job = load_job(job_file)
    compiled = compiler.build(job, root / "out")
    compiler.write(compiled)
    # The ranks run the launch probe: it records the job name each rank read from the compiled job,
    # which the trainer does not report, and a 2-node trainer run would only add minutes.
    probe_dir = tmp_path / "probe_pkg"
    probe_dir.mkdir()
    shutil.copy(REPO / "tests" / "launch_probe.py", probe_dir / "_orch_launch_probe.py")
    script = root / "out" / "probe.sbatch"
    script.write_text(render_sbatch(compiled.job, compiled.strategy, dataclasses.replace(compiled.paths, module="_orch_launch_probe")))

    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    Path(compiled.paths.log_dir).mkdir(parents=True)
    env = dict(slurm_env, PYTHONPATH=f"{slurm_env['PYTHONPATH']}:{probe_dir}")
    job_id = sbatch(script, env, cwd=tmp_path)
    state = wait_for_job(job_id, env, timeout=240)
    # %j in the directory name must stay literal in the log path (escaped as %%j).
    log = Path(compiled.paths.log_dir) / f"{compiled.job.slug()}-{job_id}.log"
    assert log.exists(), sorted(p.name for p in Path(compiled.paths.log_dir).iterdir())
    assert state == "COMPLETED", log.read_text()[-4000:]

    assert markers(tmp_path, REPO) == []
    assert (root / "setup.out").read_text() == "literal $(touch PWNED4) `touch PWNED5`; touch PWNED6\n"
    show = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, env=env).stdout
    assert f"JobName={HOSTILE}\n" in show or f"JobName={HOSTILE} " in show
    ranks = [json.loads(p.read_text()) for p in sorted((Path(compiled.job.training.output_dir) / "probe").glob("run0-rank*.json"))]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert {r["job_name"] for r in ranks} == {HOSTILE}  # the trainer gets the name intact
    assert {r["allreduce_sum"] for r in ranks} == {3.0}  # ranks 0+1 -> 1 + 2
