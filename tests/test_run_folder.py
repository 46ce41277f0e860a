"""A run already in the output dir: refused unless --resume or --restart says what to do with it
(`orch submit` before sbatch or the launcher, and the trainer at start), --restart moves it aside
and never deletes, and --resume on a finished run leaves it as it is.

The trainer runs are real (1 CPU process, tiny Llama, 3 steps)."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest

from orchestrator import preflight, submit
from orchestrator.errors import Exit, OrchError
from tests.cli_helpers import run_orch
from tests.train_helpers import check, metrics, out_dir, run_trainer, tiny_job

NOON = datetime.datetime(2026, 11, 24, 12, 0, 0, tzinfo=datetime.timezone.utc)


def test_a_folder_with_a_run_is_refused_without_resume_or_restart(tmp_path):
    out = tmp_path / "run"
    preflight.check_run_folder(out, resume=False, restart=False)  # not there yet: fine
    (out / "logs").mkdir(parents=True)
    (out / "data_cache").mkdir()
    (out / "wandb_run_id").write_text("abcd")
    preflight.check_run_folder(out, resume=False, restart=False)  # logs, a cache, a wandb id: no run
    for name in preflight.RUN_FILES:
        (out / name).touch()
        with pytest.raises(OrchError) as err:
            preflight.check_run_folder(out, resume=False, restart=False)
        assert err.value.code == Exit.BAD_SPEC
        assert str(err.value).startswith(f"training.output_dir: '{out}' holds a run ({name}") and "\n" not in str(err.value)
        assert str(err.value).endswith(f"continue it with --resume, or start afresh with --restart (moves it to "
                                       f"'{out / 'previous'}')")
        preflight.check_run_folder(out, resume=True, restart=False)
        preflight.check_run_folder(out, resume=False, restart=True)
        (out / name).unlink()


def test_restart_moves_the_run_aside_and_keeps_logs_cache_and_older_runs(tmp_path):
    out = tmp_path / "run"
    for name in ("checkpoints/step00000003", "logs", "data_cache", "adapter", "wandb"):
        (out / name).mkdir(parents=True)
    for name in ("metrics.jsonl", "summary.json", "memory.png", "wandb_run_id", "logs/tiny-7.log"):
        (out / name).write_text(name)
    moved = preflight.move_run_aside(out, NOON)
    assert moved == out / "previous" / "20261124T120000Z"
    assert sorted(p.name for p in moved.iterdir()) == ["adapter", "checkpoints", "memory.png", "metrics.jsonl",
                                                        "summary.json", "wandb", "wandb_run_id"]
    assert (moved / "metrics.jsonl").read_text() == "metrics.jsonl"  # moved, not rewritten
    assert sorted(p.name for p in out.iterdir()) == ["data_cache", "logs", "previous"]
    assert (out / "logs" / "tiny-7.log").read_text() == "logs/tiny-7.log"
    assert preflight.move_run_aside(out, NOON) is None  # nothing left to move
    (out / "summary.json").write_text("second")  # a second run, restarted in the same second
    assert preflight.move_run_aside(out, NOON) == out / "previous" / "20261124T120000Z-1"
    assert (moved / "summary.json").read_text() == "summary.json"  # the first one is still there
    assert preflight.move_run_aside(tmp_path / "never-made", NOON) is None


def test_submit_passes_resume_or_restart_to_the_batch_script(tmp_path):
    from orchestrator import compiler
    from orchestrator.spec import load_job
    from tests.cli_helpers import REPO_ROOT

    compiled = compiler.build(load_job(REPO_ROOT / "jobs" / "tiny.yaml", check_paths=False), tmp_path)
    script = str(compiled.files["sbatch"])
    assert submit.sbatch_command(compiled, submit.SubmitOptions()) == ["sbatch", "--parsable", script]
    assert submit.sbatch_command(compiled, submit.SubmitOptions(resume=True))[-2:] == [script, "--resume"]
    assert submit.sbatch_command(compiled, submit.SubmitOptions(restart=True))[-2:] == [script, "--restart"]
    assert submit.local_launch(compiled, submit.SubmitOptions(local=True, restart=True), 29500).args[-1] == "--restart"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A tiny job trained to its last step (3), its checkpoint at step 3."""
    folder = tmp_path_factory.mktemp("finished")
    job = tiny_job(folder, "done", training={"max_steps": 3})
    check(run_trainer(job))
    return job


def _snapshot(out: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``out`` but the data cache: bytes and modification time."""
    return {str(p.relative_to(out)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(out.rglob("*"))
            if p.is_file() and "data_cache" not in p.parts}


def test_trainer_refuses_a_folder_with_a_run_and_resume_leaves_a_finished_run_alone(finished_run):
    """Bugs fixed: a second start trained from step 0 over the first run (appending a second copy of
    its steps to metrics.jsonl), and --resume on a finished run rewrote summary.json with null loss."""
    out = out_dir(finished_run)
    before = _snapshot(out)
    assert json.loads((out / "summary.json").read_text())["final_loss"] is not None
    proc = run_trainer(finished_run)
    check(proc, Exit.BAD_SPEC)
    assert proc.stderr == (f"orch: error: training.output_dir: '{out}' holds a run (checkpoints, metrics.jsonl, "
                           f"summary.json); continue it with --resume, or start afresh with --restart (moves it to "
                           f"'{out / 'previous'}')\n")
    assert _snapshot(out) == before
    proc = run_trainer(finished_run, args=("--resume",))
    check(proc)
    assert f"orch: {out} is already finished (its checkpoint step00000003 is step 3 of 3); nothing to do" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _snapshot(out) == before  # nothing rewritten


def test_submit_refuses_a_folder_with_a_run_before_sbatch(finished_run, tmp_path):
    out = out_dir(finished_run)
    before = _snapshot(out)
    for where in ([], ["--local"]):  # sbatch is not on PATH here: the refusal comes first
        proc = run_orch("submit", finished_run, *where, "--out", tmp_path, env={"PATH": "/usr/bin:/bin"},
                        cwd=finished_run.parent)
        assert proc.returncode == Exit.BAD_SPEC, proc.stderr
        assert proc.stderr.splitlines() == [f"orch: error: training.output_dir: '{out}' holds a run (checkpoints, "
                                            f"metrics.jsonl, summary.json); continue it with --resume, or start "
                                            f"afresh with --restart (moves it to '{out / 'previous'}')"]
    assert _snapshot(out) == before


def test_restart_moves_the_run_aside_and_trains_from_step_0(finished_run, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(finished_run.parent, folder)
    job = folder / finished_run.name
    job.write_text(job.read_text().replace(str(finished_run.parent), str(folder)))
    out = out_dir(job)
    first = _snapshot(out)
    proc = run_trainer(job, args=("--restart",))
    check(proc)
    (previous,) = (out / "previous").iterdir()
    assert f"orch: --restart: moved the previous run to {previous}" in proc.stderr
    assert _snapshot(previous) == first  # the first run, whole and untouched
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]  # trained again from step 1, each step once
    assert json.loads((out / "summary.json").read_text())["steps"] == 3


def _planted_checkpoint(out: Path, strategy: str, world: int, global_batch: int) -> Path:
    """A complete checkpoint's marker and DeepSpeed's model-states file name (what `--resume` reads
    before anything loads); the tensors themselves are never read by these tests."""
    ckpt = out / "checkpoints" / "step00000002"
    ckpt.mkdir(parents=True)
    (ckpt / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"")
    (ckpt / "COMPLETE").write_text(json.dumps({"step": 2, "world_size": world, "strategy": strategy,
                                               "global_batch": global_batch}))
    return ckpt


@pytest.mark.parametrize("saved", ["zero2", "zero3"])
def test_submit_resume_with_strategy_auto_keeps_the_checkpoint_zero_stage(tmp_path, saved):
    from orchestrator.strategy import STRATEGIES

    job = tiny_job(tmp_path, "keep", strategy="auto")
    _planted_checkpoint(out_dir(job), saved, 2, 8)
    fresh = run_orch("submit", job, "--dry-run", "--out", tmp_path / "c", cwd=tmp_path)
    resumed = run_orch("submit", job, "--dry-run", "--resume", "--out", tmp_path / "c", cwd=tmp_path)
    assert fresh.returncode == resumed.returncode == 0, fresh.stderr + resumed.stderr
    chosen = {name: next(line.split()[1] for line in p.stdout.splitlines() if line.startswith("strategy:"))
              for name, p in (("fresh", fresh), ("resumed", resumed))}
    assert STRATEGIES[chosen["fresh"]].zero_stage == 0  # one GPU: single_gpu unless a checkpoint says otherwise
    assert STRATEGIES[chosen["resumed"]].zero_stage == STRATEGIES[saved].zero_stage


def test_submit_resume_refuses_a_changed_global_batch_before_launching(tmp_path):
    job = tiny_job(tmp_path, "batch", strategy="zero3", training={"global_batch_size": 16})
    out = out_dir(job)
    _planted_checkpoint(out, "zero3", 2, 8)
    proc = run_orch("submit", job, "--local", "--resume", "--out", tmp_path / "c", cwd=tmp_path)
    assert proc.returncode == Exit.BAD_SPEC, proc.stderr
    (line,) = proc.stderr.splitlines()
    assert "trained with training.global_batch_size 8, this run has 16" in line
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints"]  # nothing launched
