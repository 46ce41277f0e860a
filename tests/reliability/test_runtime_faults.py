"""Runtime faults, on the CPU with the real trainer and real DeepSpeed:

* kill -9 of the trainer while it writes a checkpoint: the previous complete
  checkpoint stays usable, the half-written one is never picked, and the resumed
  run's losses equal an uninterrupted run's (same seed).
* a CUDA out-of-memory error inside a step: a one-line plan-vs-actual message,
  exit code 5, no traceback.

The kill lands during a write deterministically, and the OOM is injected because this
machine has no GPU: both run the real trainer through tests/fault_trainer.py, which gives it
hooks at its test seams (orchestrator/faults.py): ``--pause-in-save 4`` sleeps after this rank's
files of step 4 are written, before COMPLETE; ``--oom-at-step 3`` raises torch's CUDA
out-of-memory error inside step 3.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator import checkpoint, memory, preflight
from orchestrator.catalog import GIB
from orchestrator.spec import load_job
from tests.train_helpers import check, env, losses, out_dir, run_trainer, tiny_job


def _job(folder: Path, name: str) -> Path:
    return tiny_job(folder, name, training={"max_steps": 6, "save_every": 2, "seed": 7},
                    logging={"wandb_mode": "disabled", "log_every": 1})


def test_kill9_during_checkpoint_write_resumes_exactly(tmp_path: Path) -> None:
    ref_job = _job(tmp_path, "ref")
    check(run_trainer(ref_job))
    ref = losses(out_dir(ref_job))
    assert sorted(ref) == [1, 2, 3, 4, 5, 6]

    job = _job(tmp_path, "killed")
    out = out_dir(job)
    err_path = tmp_path / "killed.stderr"
    with err_path.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "tests.fault_trainer", "--pause-in-save", "4", "--job", str(job)],
                                cwd=tmp_path, env=env(), stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.time() + 300
            while "paused in save of step 4" not in err_path.read_text():
                assert proc.poll() is None, f"trainer exited {proc.returncode} before the save:\n{err_path.read_text()[-3000:]}"
                assert time.time() < deadline, "trainer never reached the save of step 4"
                time.sleep(0.2)
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=60) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()

    root = out / "checkpoints"
    half = root / checkpoint.tag_for(4)
    assert half.is_dir() and any(half.iterdir()), "the killed save wrote nothing: the kill did not land mid-write"
    assert not (half / checkpoint.MARKER).exists()
    picked = checkpoint.latest(root)
    assert picked is not None and picked.step == 2, f"resume would pick {picked}"
    # the preflight's planned checkpoint size is an upper bound of the real one (and not wildly above it)
    on_disk = sum(p.stat().st_size for p in picked.path.rglob("*") if p.is_file())
    planned = preflight.checkpoint_bytes(load_job(job, check_paths=False), "single_gpu")
    assert on_disk <= planned < 3 * on_disk, (on_disk, planned)

    check(run_trainer(job, args=("--resume",)))
    got = losses(out)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), (step, got[step], ref[step])
    # the re-save of step 4 replaced the half-written folder with a complete one
    assert (half / checkpoint.MARKER).is_file()


def test_runtime_cuda_oom_is_one_line_plan_vs_actual_exit_5(tmp_path: Path) -> None:
    job = _job(tmp_path, "oom")
    e_proc = subprocess.run([sys.executable, "-m", "tests.fault_trainer", "--oom-at-step", "3", "--job", str(job)],
                            cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600)
    assert e_proc.returncode == 5, e_proc.stderr[-3000:]
    assert "Traceback" not in e_proc.stderr
    lines = [l for l in e_proc.stderr.splitlines() if l.startswith("orch: error:")]
    assert len(lines) == 1, e_proc.stderr[-3000:]
    # the prediction is orch's memory model for this job; on the CPU there is no allocator to say what was used
    predicted = memory.estimate(load_job(job, check_paths=False), "single_gpu").peak_allocated
    assert lines[0] == (f"orch: error: out of GPU memory on rank 0 in step 3 with strategy single_gpu: predicted peak "
                        f"{predicted / GIB:.2f} GiB, used unknown (max allocated); "
                        "try strategy=zero3_offload_optimizer (orch plan shows the options)")
    # the OOM hit step 3: steps 1-2 were logged, nothing after
    assert sorted(losses(out_dir(job))) == [1, 2]
