"""The speed levers through the real trainer (subprocess runs of orchestrator.train on the CPU):
training.engine plain vs deepspeed on the same job, resume with each engine's checkpoints, and
training.compile=true vs false.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.errors import Exit
from tests.train_helpers import check, loss_parity, losses, metrics, out_dir, run_trainer, stopped_copy, summary, tiny_job

pytestmark = pytest.mark.slow

QLORA = {"method": "qlora", "quantization": {"compute_dtype": "fp32", "storage_dtype": "fp32"}}
# measured on this CPU: plain vs deepspeed 0 (identical arithmetic in fp32), compiled vs eager 0
RTOL = 1e-6


def _run(tmp_path_factory, name: str, *overrides: str, **sections) -> Path:
    job = tiny_job(tmp_path_factory.mktemp(name), name, **sections)
    check(run_trainer(job, overrides=overrides))
    return job


@pytest.fixture(scope="module")
def deepspeed_run(tmp_path_factory):
    return _run(tmp_path_factory, "ds", "training.engine=deepspeed", training={"save_every": 3}, **QLORA)


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    return _run(tmp_path_factory, "plain", training={"save_every": 3}, **QLORA)  # auto: plain on single_gpu fp32


def test_plain_engine_trains_like_deepspeed(deepspeed_run, plain_run):
    assert summary(out_dir(deepspeed_run))["engine"] == "deepspeed"
    assert summary(out_dir(plain_run))["engine"] == "plain"
    loss_parity(deepspeed_run, plain_run, RTOL)
    lrs = lambda job: [r["lr"] for r in metrics(out_dir(job))]  # noqa: E731
    assert lrs(deepspeed_run) == lrs(plain_run)
    files = {p.name for p in (out_dir(plain_run) / "checkpoints" / "step00000003").iterdir()}
    assert files == {"plain_engine.pt", "rng_rank0.pt", "COMPLETE"}


def test_plain_engine_resumes_through_the_trainer(tmp_path, plain_run):
    job = stopped_copy(plain_run, tmp_path / "resume", after_step=3)
    proc = run_trainer(job, args=("--resume",))
    check(proc)
    assert "resumed from" in proc.stderr and "step 3" in proc.stderr
    before, after = losses(out_dir(plain_run)), losses(out_dir(job))
    assert sorted(after) == [4, 5, 6]
    assert all(after[s] == before[s] for s in after), (before, after)  # bit for bit


def test_checkpoint_of_the_other_engine_is_a_clear_error(tmp_path, deepspeed_run, plain_run):
    job = stopped_copy(deepspeed_run, tmp_path / "ds", after_step=3)
    proc = run_trainer(job, args=("--resume",), overrides=("training.engine=plain",))
    check(proc, Exit.BAD_SPEC)  # a spec setting to change, found before anything loads
    assert "written by the deepspeed engine, this run uses the plain engine; resume it with training.engine=deepspeed" \
        in proc.stderr
    job = stopped_copy(plain_run, tmp_path / "plain", after_step=3)
    proc = run_trainer(job, args=("--resume",), overrides=("training.engine=deepspeed",))
    check(proc, Exit.BAD_SPEC)
    assert "written by the plain engine, this run uses the deepspeed engine; resume it with training.engine=plain" \
        in proc.stderr


def test_compiled_layers_train_like_eager(tmp_path_factory):
    eager = _run(tmp_path_factory, "eager", "training.compile=false", method="lora")
    compiled = _run(tmp_path_factory, "compiled", "training.compile=true", method="lora")
    assert summary(out_dir(eager))["compiled_variants"] is None
    # one compiled graph for both layers and all 6 steps (every row is packed: always a mask)
    assert summary(out_dir(compiled))["compiled_variants"] == 1
    loss_parity(eager, compiled, RTOL)
