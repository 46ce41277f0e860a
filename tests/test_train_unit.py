"""Trainer pieces that need no DeepSpeed run: checkpoint discovery, scheduler fix, OOM message, CLI parsing."""

from __future__ import annotations

import json

import pytest

from orchestrator import checkpoint as C
from orchestrator import train as T
from orchestrator.errors import Exit
from orchestrator.spec import load_job
from tests.train_helpers import tiny_job


def test_latest_ignores_checkpoints_without_marker(tmp_path):
    root = tmp_path / "checkpoints"
    for step, complete in ((3, True), (6, True), (9, False)):
        d = root / C.tag_for(step)
        d.mkdir(parents=True)
        (d / "mp_rank_00_model_states.pt").write_bytes(b"x")
        if complete:
            (d / C.MARKER).write_text(json.dumps({"step": step, "world_size": 2, "strategy": "zero3"}))
    (root / "step00000012").mkdir()
    (root / "step00000012" / C.MARKER).write_text("not json")  # torn/foreign marker: not complete
    info = C.latest(root)
    assert info is not None and info.step == 6 and info.world_size == 2 and info.tag == "step00000006"
    assert C.latest(tmp_path / "nothing") is None


@pytest.mark.parametrize("schedule,kind", [("constant", "WarmupLR"), ("linear", "WarmupDecayLR"), ("cosine", "WarmupCosineLR")])
def test_no_warmup_starts_at_peak_lr(tmp_path, schedule, kind):
    """DeepSpeed's schedulers reject warmup 0; the generated config must give lr = training.lr from the first step."""
    import torch
    from deepspeed.runtime import lr_schedules

    from orchestrator.deepspeed_config import build_ds_config

    job = load_job(tiny_job(tmp_path, schedule, training={"lr_schedule": schedule, "warmup_steps": 0, "lr": 0.01}))
    config = build_ds_config(job, "single_gpu", job.shape(), 6)
    sched = config["scheduler"]
    assert sched["type"] == kind and sched["params"]["warmup_num_steps"] == 1
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    s = getattr(lr_schedules, kind)(opt, **sched["params"])
    s.step()  # iteration 0: the lr of the first optimizer step
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)


def test_oom_message_names_prediction_use_and_next_strategy(tmp_path):
    job = load_job(tiny_job(tmp_path, "oom", hardware={"gpus_per_node": 2}, strategy="zero2",
                            training={"global_batch_size": 8}))
    trainer = T.Trainer(job, "zero2", None, False)
    # what setup() would have set; on this CPU there is no CUDA allocator to ask
    import torch

    trainer.torch, trainer.cuda, trainer.rank = torch, False, 1
    msg = trainer.oom_message()
    assert msg.startswith("out of GPU memory on rank 1 in step 1 with strategy zero2: predicted peak ")
    assert "try strategy=zero3" in msg and "\n" not in msg


def test_cli_accepts_launcher_local_rank_and_overrides():
    args = T.build_parser().parse_args(["--local_rank=1", "--job", "j.yaml", "strategy=zero3", "--resume"])
    assert args.job == "j.yaml" and args.overrides == ["strategy=zero3"] and args.resume and args.local_rank == 1


def test_bad_spec_exits_2(tmp_path, capsys):
    job = tiny_job(tmp_path, "bad", training={"micro_batch_size": 0})
    assert T.main(["--job", str(job)]) == 2
    assert "training.micro_batch_size" in capsys.readouterr().err


def test_spec_error_prints_every_problem_with_the_prefix(tmp_path, capsys):
    job = tiny_job(tmp_path, "bad2", training={"micro_batch_size": 0, "lr": 5})
    assert T.main(["--job", str(job)]) == Exit.BAD_SPEC
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and all(line.startswith("orch: error: ") for line in lines), lines
    assert "training.micro_batch_size" in lines[0] and "training.lr" in lines[1]
