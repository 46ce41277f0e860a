"""Resume on another number of processes: real DeepSpeed on CPU, orch's launcher, the tiny Llama.

For full and qlora under ZeRO-2 and ZeRO-3, the reference is an uninterrupted 2-process run of 6
steps that checkpoints every 2 steps (cosine schedule with warmup: the scheduler's state must carry
over too). Its step-2 checkpoint resumes on 1 process (2 -> 1: `--resume` converts it to DeepSpeed's
universal form and loads that), which trains steps 3..6 and checkpoints at 4 and 6; that run's
step-4 checkpoint resumes on 2 processes (1 -> 2). Each resumed step's loss equals the reference's
within RESUME_RTOL: the same global batches (the data position is the step, in global batches),
the same fp32 masters, Adam moments and lr.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator import checkpoint as C
from tests.train_helpers import check, env, losses, out_dir, run_trainer, stopped_copy, tiny_job

pytestmark = pytest.mark.slow

# 1- vs 2-process runs differ by float summation order only (gloo all-reduce, ZeRO bucket flattening);
# measured max relative difference of a resumed step: 8.4e-8 (full), 7.8e-8 (qlora).
RESUME_RTOL = 1e-6

QLORA = {"method": "qlora", "quantization": {"compute_dtype": "fp32", "storage_dtype": "fp32"}}
SCHEDULE = {"save_every": 2, "lr_schedule": "cosine", "warmup_steps": 2}

CASES = [("full", "zero2"), ("full", "zero3"), ("qlora", "zero2"), ("qlora", "zero3")]


@pytest.fixture(scope="module", params=CASES, ids=["-".join(c) for c in CASES])
def reference(request, tmp_path_factory):
    """The uninterrupted 2-process run of one (method, strategy)."""
    method, strategy = request.param
    name = f"{method}{strategy}"
    folder = tmp_path_factory.mktemp(name)
    job = tiny_job(folder, name, strategy=strategy, training=SCHEDULE, **(QLORA if method == "qlora" else {}))
    check(run_trainer(job, 2))
    return job


def assert_same_losses(reference: Path, resumed: Path, steps: list[int]) -> None:
    before, after = losses(out_dir(reference)), losses(out_dir(resumed))
    assert sorted(after) == steps
    worst = max(abs(after[s] - before[s]) / abs(before[s]) for s in steps)
    print(f"{resumed.stem}: max relative loss difference of the resumed steps {worst:.3g}")
    assert worst <= RESUME_RTOL, (before, after)


def test_resume_on_one_process_then_on_two_keeps_the_loss_curve(reference, tmp_path):
    one = stopped_copy(reference, tmp_path / "to1", after_step=2)
    proc = run_trainer(one, 1, args=("--resume",))
    check(proc)
    assert "step00000002 was saved by 2 processes, this run has 1" in proc.stderr
    assert (out_dir(one) / "checkpoints" / "step00000002" / C.UNIVERSAL / C.MARKER).is_file()
    assert_same_losses(reference, one, [3, 4, 5, 6])

    two = stopped_copy(one, tmp_path / "to2", after_step=4)  # step 4 was written by the 1-process run
    proc = run_trainer(two, 2, args=("--resume",))
    check(proc)
    assert "step00000004 was saved by 1 processes, this run has 2" in proc.stderr
    assert_same_losses(reference, two, [5, 6])


def _files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("reference", [("qlora", "zero3")], indirect=True, ids=["qlora-zero3"])
def test_a_killed_conversion_is_never_used(reference, tmp_path):
    """kill -9 after DeepSpeed's converter wrote the universal form but before its marker: the next
    --resume does not load that folder; it converts again and the losses are the reference's."""
    job = stopped_copy(reference, tmp_path / "killed", after_step=2)
    ckpt = out_dir(job) / "checkpoints" / "step00000002"
    proc = subprocess.run([sys.executable, "-m", "tests.fault_trainer", "--kill-in-convert", "2", "--job", str(job),
                           "--resume"], cwd=job.parent, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-3000:]
    partial = ckpt / (C.UNIVERSAL + ".partial")
    assert (partial / "zero").is_dir() and not (partial / C.MARKER).exists() and not (ckpt / C.UNIVERSAL).exists()
    (partial / "zero" / "planted.pt").write_bytes(b"not a tensor")  # were it loaded, the load would fail

    proc = run_trainer(job, 1, args=("--resume",))
    check(proc)
    assert not partial.exists() and not (ckpt / C.UNIVERSAL / "zero" / "planted.pt").exists()
    assert_same_losses(reference, job, [3, 4, 5, 6])


@pytest.mark.parametrize("saved_by,resumed_on", [(2, 1), (1, 2)])
def test_a_failed_conversion_stops_with_one_line_and_leaves_the_checkpoint(tmp_path, saved_by, resumed_on):
    """On 2 processes rank 0 converts and rank 1 waits: it must get the failure too, not hang."""
    first = tiny_job(tmp_path, "torn", strategy="zero2", training={"save_every": 2, "max_steps": 4})
    check(run_trainer(first, saved_by))
    job = stopped_copy(first, tmp_path / "failed", after_step=2)
    ckpt = out_dir(job) / "checkpoints" / "step00000002"
    (ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"torn")  # a partition DeepSpeed cannot read
    before = _files(ckpt)
    proc = run_trainer(job, resumed_on, args=("--resume",))
    check(proc, 5)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("orch: error:")]
    # every rank stops on rank 0's error, one line each (not stopped by the launcher mid-load)
    assert len(errors) == resumed_on and all("universal conversion" in e for e in errors)
    assert "Traceback" not in proc.stderr
    assert _files(ckpt) == before  # nothing added (no universal/ nor universal.partial/), nothing changed
    assert not (out_dir(job) / "metrics.jsonl").exists()  # no step trained
