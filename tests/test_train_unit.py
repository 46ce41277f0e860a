"""Trainer pieces that need no DeepSpeed run: checkpoint discovery, scheduler fix, OOM message, CLI parsing."""

from __future__ import annotations

import json

import pytest

from orchestrator import checkpoint as C
from orchestrator import memory, report
from orchestrator import train as T
from orchestrator.catalog import GIB
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
            (d / C.MARKER).write_text(json.dumps({"step": step, "world_size": 2, "strategy": "zero3", "global_batch": step + 2}))
    (root / "step00000012").mkdir()
    (root / "step00000012" / C.MARKER).write_text("not json")  # torn/foreign marker: not complete
    info = C.latest(root)
    assert info is not None and info.step == 6 and info.world_size == 2 and info.tag == "step00000006"
    assert info.global_batch == 8
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
    predicted = memory.estimate(job, "zero2").peak_allocated
    # on the CPU there is no CUDA allocator to ask: used is None
    assert report.oom_message(job, "zero2", rank=1, step=1, used=None) == (
        f"out of GPU memory on rank 1 in step 1 with strategy zero2: predicted peak {predicted / GIB:.2f} GiB, "
        "used unknown (max allocated); try strategy=zero3 (orch plan shows the options)")
    used = 3 * GIB // 2
    assert "used 1.50 GiB (max allocated)" in report.oom_message(job, "zero2", rank=1, step=1, used=used)
    assert report.oom_message(job, "zero3_offload_all", rank=0, step=4, used=None).endswith(
        "no larger-saving strategy left: lower training.micro_batch_size or data.seq_len, or add GPUs")


def test_one_definition_of_the_trainer_flags():
    """`orch train JOB` and `python -m orchestrator.train --job JOB` (what launchers run) take the same flags."""
    from orchestrator import cli

    def flags(parser) -> set[str]:
        return {o for a in parser._actions for o in a.option_strings} - {"-h", "--help"}

    sub = next(a for a in cli.build_parser()._actions if a.dest == "command").choices["train"]
    assert flags(T.module_parser()) - {"--job"} == flags(sub) >= {"--ds-config", "--resume", "--restart", "--local_rank"}


def test_cli_accepts_launcher_local_rank_and_overrides():
    args = T.module_parser().parse_args(["--local_rank=1", "--job", "j.yaml", "strategy=zero3", "--resume"])
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


def _summary(predicted_peak: int) -> report.RunSummary:
    return report.RunSummary(job="j", strategy="single_gpu", world_size=2, steps=2, engine="plain",
                             compiled_variants=None, attention="sdpa", final_loss=1.0, tokens_per_s=1.0, device="cpu",
                             load_peak_bytes=None, peak_allocated_bytes=None, cpu_rss_peak_bytes=None, load_seconds=1.0,
                             predicted_peak_bytes=predicted_peak)


def test_memory_plot_draws_like_with_like(tmp_path):
    """Bug fixed: on the CPU memory.png drew the process RSS against orch's predicted GPU peak."""
    none = {"mem_allocated": None, "mem_reserved": None, "mem_peak": None}
    cpu = [{"step": s, "rank": r, **none, "cpu_rss": (r + 1) * GIB // 2} for s in (1, 2) for r in (0, 1)]
    plot = report.memory_plot(cpu, _summary(predicted_peak=5 * GIB))
    assert [(line.label, line.steps, line.gib) for line in plot.lines] == [
        ("rank 0 process RSS", (1, 2), (0.5, 0.5)), ("rank 1 process RSS", (1, 2), (1.0, 1.0))]  # no prediction
    assert plot.ylabel == "GiB of host memory (process RSS)" and "CPU run: no GPU memory" in plot.title
    gpu = [{"step": 1, "rank": 0, "mem_allocated": GIB, "mem_peak": 2 * GIB, "mem_reserved": 3 * GIB, "cpu_rss": 7 * GIB}]
    plot = report.memory_plot(gpu, _summary(predicted_peak=5 * GIB))
    assert [(line.label, line.steps, line.gib) for line in plot.lines] == [
        ("rank 0 allocated", (1,), (1.0,)), ("rank 0 peak", (1,), (2.0,)), ("rank 0 reserved", (1,), (3.0,)),
        ("predicted peak (orch plan)", (), (5.0,))]
    assert plot.ylabel == "GiB of GPU memory (torch allocator)"
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in cpu))
    report.plot_memory(metrics, tmp_path / "memory.png", _summary(predicted_peak=5 * GIB))
    assert (tmp_path / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class _DeadWandbRun:
    """A wandb run whose service process is gone: every call raises what wandb's client raised then
    (a real service cannot be made to die between two calls on cue, and wandb's own client may
    swallow the first failures: tests/test_stop_signals.py runs the real thing)."""

    def __init__(self):
        self.calls = 0

    def log(self, data, step):
        self.calls += 1
        raise ConnectionResetError(104, "Connection reset by peer")


def test_a_failed_wandb_call_turns_wandb_off_and_metrics_go_on(tmp_path, capsys):
    """Bug fixed: a wandb.log failing with ConnectionResetError ended the run."""
    dead = _DeadWandbRun()
    log = report.MetricsLog(tmp_path / "metrics.jsonl", dead)
    for step in (1, 2, 3):
        log.log(report.StepRecord(step=step, rank=0, loss=1.0, lr=None, tokens_per_s=None, mem_allocated=None,
                                  mem_reserved=None, mem_peak=None, cpu_rss=1, time=0.0))
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert dead.calls == 1 and log.wandb_run is None  # not asked again after the first failure
    warnings = capsys.readouterr().err.splitlines()
    assert warnings == ["orch: warning: wandb log of step 1 failed (ConnectionResetError: [Errno 104] Connection "
                        "reset by peer); logging to metrics.jsonl only from now on"]


def _info(tmp_path, strategy: str, world: int, global_batch=8) -> C.CheckpointInfo:
    return C.CheckpointInfo(tmp_path / "step00000004", "step00000004", 4, world, strategy, global_batch)


@pytest.mark.parametrize("saved,written,strategy,engine,world,batch,wanted", [
    # the data position and the lr schedule count global batches
    (("zero3", 2), "deepspeed", "zero3", "deepspeed", 2, 16, "training.global_batch_size 8, this run has 16"),
    (("zero3", 2), "deepspeed", "zero2", "deepspeed", 1, 8, "resume with strategy: zero3"),  # DeepSpeed fails 3 -> 2
    (("zero2", 2), "deepspeed", "zero3", "deepspeed", 2, 8, "resume with strategy: zero2"),
    (("single_gpu", 1), "plain", "zero2", "deepspeed", 1, 8, "resume with strategy: single_gpu"),
    (("single_gpu", 1), "plain", "single_gpu", "deepspeed", 1, 8, "training.engine=plain"),
    (("single_gpu", 1), "deepspeed", "single_gpu", "deepspeed", 2, 8, "has no ZeRO): resume it on 1"),
    (("zero3_offload_optimizer_nvme", 2), "deepspeed", "zero3_offload_optimizer", "deepspeed", 1, 8, "NVMe"),
    (("zero3", 2), "deepspeed", "zero3_offload_all_nvme", "deepspeed", 4, 8, "NVMe"),
])
def test_check_resumable_names_what_to_keep(tmp_path, saved, written, strategy, engine, world, batch, wanted):
    with pytest.raises(C.CheckpointError) as err:
        C.check_resumable(_info(tmp_path, *saved), written, strategy, engine, world, batch)
    assert wanted in str(err.value) and err.value.code == Exit.BAD_SPEC


@pytest.mark.parametrize("saved,strategy,world,batch", [
    (("zero3", 2, 8), "zero3_offload_optimizer", 1, 8),  # offload may change with the process count
    (("zero2", 1, 8), "zero2", 4, 8),
    (("zero3", 2, None), "zero3", 2, 32),  # a marker from before the global batch was recorded
])
def test_check_resumable_lets_a_zero_checkpoint_change_process_count(tmp_path, saved, strategy, world, batch):
    C.check_resumable(_info(tmp_path, *saved), "deepspeed", strategy, "deepspeed", world, batch)


def test_conversion_needs_room_for_its_peak_on_disk(tmp_path, monkeypatch):
    """A full disk cannot be made here: preflight.disk_free is replaced, as the output-dir room tests do."""
    from orchestrator import preflight

    info = _info(tmp_path, "zero3", 2)
    info.path.mkdir()
    (info.path / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x" * 300)
    (info.path / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"x" * 200)
    (info.path / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"x" * 1000)
    # fragments + masters and moments (2 x 500), the model states' copy (1000), one partition again (300)
    assert C.conversion_bytes(info.path) == 2 * (300 + 200) + 1000 + 300
    monkeypatch.setattr(preflight, "disk_free", lambda folder: 2299)
    with pytest.raises(C.CheckpointError, match="needs about"):
        C.to_universal(info)
    assert sorted(p.name for p in info.path.iterdir()) == ["zero_pp_rank_0_mp_rank_00_model_states.pt",
                                                           "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                                           "zero_pp_rank_1_mp_rank_00_optim_states.pt"]


def test_a_checkpoint_of_an_unknown_strategy_is_named_not_guessed(tmp_path):
    with pytest.raises(C.CheckpointError, match="strategy 'zero9', which this orch does not know"):
        C.check_resumable(_info(tmp_path, "zero9", 2), "deepspeed", "zero3", "deepspeed", 2, 8)
