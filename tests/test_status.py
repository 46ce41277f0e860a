"""`orch status`: a run's progress from its output folder (orchestrator/progress.py), for a run folder and
for a Slurm job (found through the batch script orch wrote), against real trainer runs and the real local
Slurm cluster."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator import cli, memory, progress
from orchestrator.catalog import GIB
from orchestrator.spec import load_job
from tests._slurm import REPO, wait_for_job
from tests.train_helpers import check, metrics, run_trainer, tiny_job


def _status(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(["status", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_status_of_a_finished_local_run(tmp_path, capsys):
    job_path = tiny_job(tmp_path, "st", training={"max_steps": 4}, logging={"wandb_mode": "disabled", "log_every": 1})
    check(run_trainer(job_path))
    job = load_job(job_path)
    out = job.output_dir()
    info = progress.RunInfo.read(out)
    predicted = memory.estimate(job, "single_gpu").peak_allocated
    assert info == progress.RunInfo("st", "single_gpu", 1, 4, 0, info.start_time, predicted, 0)
    last = metrics(out)[-1]
    code, shown, err = _status(capsys, str(out))
    assert code == 0 and err == ""
    assert shown.splitlines() == [
        f"run: {out} (st)",
        f"  step 4 / 4 (100 %), finished, loss {last['loss']:.4f}, {last['tokens_per_s']:,.0f} tok/s",
        f"  peak memory: measured n/a (no GPU counter: a CPU run), predicted {predicted / GIB:.2f} GiB",
    ]


def _write_run(out: Path, records: list[dict], **info) -> None:
    """A run folder in the trainer's format (progress.py's docstring): run.json and metrics.jsonl lines."""
    out.mkdir(parents=True, exist_ok=True)
    fields = dict(job="j", strategy="zero3", world_size=2, total_steps=30, start_step=0, start_time=1000.0,
                  predicted_peak_bytes=10 * GIB, predicted_eval_peak_bytes=0)
    progress.RunInfo(**{**fields, **info}).write(out)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_progress_while_running_eta_eval_loss_and_peak(tmp_path):
    out = tmp_path / "run"
    records = [
        {"step": 5, "rank": 0, "loss": 2.5, "tokens_per_s": 900.0, "mem_peak": 9 * GIB, "time": 1030.0},
        {"step": 5, "rank": 1, "loss": 2.5, "tokens_per_s": 900.0, "mem_peak": 11 * GIB, "time": 1030.0},
        {"step": 5, "rank": 0, "eval_loss": 2.75},
        {"step": 10, "rank": 0, "loss": 2.25, "tokens_per_s": 1000.0, "mem_peak": 10 * GIB, "time": 1050.0},
        {"step": 10, "rank": 1, "loss": 2.25, "tokens_per_s": 1000.0, "mem_peak": 10 * GIB, "time": 1050.0},
        {"step": 11, "rank": 0, "loss": 2.2},  # the line being written: cut short
    ]
    _write_run(out, records)
    (out / "metrics.jsonl").write_text((out / "metrics.jsonl").read_text()[:-20])
    p = progress.read_progress(out)
    # 10 steps in 1050 - 1000 = 50 s: 5 s per step, 20 steps to go: 100 s
    assert (p.step, p.total_steps, p.loss, p.tokens_per_s, p.eta_s) == (10, 30, 2.25, 1000.0, 100.0)
    assert (p.eval_loss, p.eval_step) == (2.75, 5)
    assert p.measured_peak_bytes == 11 * GIB and not p.finished  # the largest over ranks and steps
    assert progress.render_progress(p).splitlines()[1:] == [
        "  step 10 / 30 (33 %), loss 2.2500, eval loss 2.7500 (step 5), 1,000 tok/s, ETA 1m 40s",
        "  peak memory: measured 11.00 GiB (max over ranks), predicted 10.00 GiB (+10.0 % vs predicted)",
    ]
    # after a resume at step 10 (start_time 2000): the pace of this start only, 4 steps in 40 s
    _write_run(out, records[:5] + [{"step": 14, "rank": 0, "loss": 2.0, "time": 2040.0}], start_step=10, start_time=2000.0)
    assert progress.read_progress(out).eta_s == 10.0 * 16


def test_status_before_anything_is_logged(tmp_path, capsys):
    code, shown, _ = _status(capsys, str(tmp_path))
    assert code == 0
    assert shown == f"run: {tmp_path}\n  no steps logged yet (queued, loading the model, or before the first log step)\n"


def test_status_does_not_import_torch(tmp_path):
    _write_run(tmp_path / "run", [{"step": 1, "rank": 0, "loss": 3.0, "time": 1001.0}])
    code = (f"import sys; from orchestrator.cli import main; rc = main(['status', {str(tmp_path / 'run')!r}]); "
            "heavy = [m for m in ('torch', 'transformers', 'deepspeed', 'bitsandbytes', 'numpy') if m in sys.modules]; "
            "print('HEAVY', heavy, rc)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "HEAVY [] 0" in proc.stdout, proc.stdout + proc.stderr


def test_status_of_something_else_is_one_line(tmp_path, capsys):
    code, shown, err = _status(capsys, str(tmp_path / "gone"))
    assert code == 2 and shown == ""
    assert err == f"orch: error: {str(tmp_path / 'gone')!r} is neither a run folder nor a Slurm job id\n"


def _orch(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)


@pytest.mark.slurm
def test_status_of_a_slurm_job_finds_its_run_folder(slurm_env, tmp_path):
    """The job sleeps in its setup line (no trainer runs in it); the run folder it names gets a real
    training run from this process, and `orch status JOBID` shows that run's progress."""
    run = tmp_path / "run"
    proc = _orch(["submit", "jobs/tiny.yaml", "strategy=single_gpu", f"training.output_dir={run}",
                  "slurm.setup=[echo setup-ran, sleep 300]", "--out", str(tmp_path)], slurm_env)
    assert proc.returncode == 0, proc.stderr
    job_id = re.fullmatch(r"submitted job (\d+)\nlog: (.+)\n", proc.stdout).group(1)
    log = run / "logs" / f"tiny-{job_id}.log"
    try:
        deadline = time.monotonic() + 60
        while not (log.exists() and "setup-ran" in log.read_text()):
            assert time.monotonic() < deadline, "job did not start"
            time.sleep(0.3)
        before = _orch(["status", job_id], slurm_env)
        assert before.returncode == 0, before.stderr
        assert before.stdout.splitlines() == [
            before.stdout.splitlines()[0],
            f"run: {run}",
            "  no steps logged yet (queued, loading the model, or before the first log step)"]
        assert re.fullmatch(rf"job {job_id} tiny: RUNNING, run time \S+ on 1 node\(s\)", before.stdout.splitlines()[0])

        compiled = tmp_path / "slurm" / "tiny.job.yaml"
        check(run_trainer(compiled, overrides=("training.max_steps=3", "logging.wandb_mode=disabled")))
        after = _orch(["status", job_id], slurm_env)
        assert after.returncode == 0, after.stderr
        lines = after.stdout.splitlines()
        assert lines[1] == f"run: {run} (tiny)"
        assert lines[2].startswith(f"  step 3 / 3 (100 %), finished, loss {metrics(run)[-1]['loss']:.4f}, ")
    finally:
        subprocess.run(["scancel", job_id], env=slurm_env)
    assert wait_for_job(job_id, slurm_env, timeout=60) == "CANCELLED"
    gone = _orch(["status", "999999"], slurm_env)
    assert gone.returncode == 4 and gone.stderr.startswith("orch: error: job 999999: Slurm does not know it (")
    assert len(gone.stderr.splitlines()) == 1
