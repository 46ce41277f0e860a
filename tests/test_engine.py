"""PlainEngine (orchestrator/engine.py): the same job through DeepSpeed's single_gpu engine and
through PlainEngine gives the same loss curve; checkpoints resume exactly through
orchestrator/checkpoint.py's protocol; the engine choice.

DeepSpeed runs in a subprocess (tests/engine_runs.py: its process group would outlive the
test); PlainEngine runs here. Both build orch's tiny model with the same seed and see the
same batches (two packed examples per row), 6 optimizer steps, cosine schedule with 2
warmup steps, clipping at a norm every step exceeds.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from orchestrator import checkpoint as C
from orchestrator import engine as E
from orchestrator.deepspeed_config import build_ds_config
from orchestrator.spec import load_job
from tests import engine_runs as R
from tests.train_helpers import REPO, check, env, tiny_job

pytest.importorskip("bitsandbytes")

STEPS = 6
CLIP = 0.05  # measured gradient norms of these runs: 0.27 to 1.35, so clipping binds at every step

# Max relative difference of the loss curves, DeepSpeed vs PlainEngine, measured on this CPU
# (2026-11-24, DeepSpeed 0.19.8, torch 2.13) over lora/qlora x grad accumulation 1-3: fp32 0;
# bf16 0 to 1.6e-5. The operations are the same, in the same order, except the AdamW kernel (fused
# here, foreach in DeepSpeed) and the clip factor (a tensor here, a Python float in DeepSpeed's
# bf16 optimizer); in bf16 one last-bit difference in a master weight can flip the rounding of its
# bf16 copy. So fp32 checks the arithmetic both dtypes share (leaving clipping out moves its curve
# by 3.1e-5, far over the bound), and bf16 the bf16 path (masters, their copy into the weights)
# for anything larger than rounding: leaving clipping out moves bf16 curves by only 2e-5 to 4e-5,
# inside bf16 noise, and DeepSpeed's un-neutralized init step by 2e-5 to 8e-5.
TOLERANCE = {"fp32": 1e-6, "bf16": 1e-4}


def _job_path(tmp_path, method: str, dtype: str, ga: int, name: str = "engine"):
    return tiny_job(tmp_path, name, method=method, model={"dtype": dtype}, quantization={"compute_dtype": dtype},
                    lora={"dropout": 0.0},
                    training={"global_batch_size": 2 * ga, "max_grad_norm": CLIP, "lr": 1e-2, "weight_decay": 0.1,
                              "lr_schedule": "cosine", "warmup_steps": 2, "max_steps": STEPS, "loss_chunk_tokens": 24})


def _plain(job) -> E.PlainEngine:
    module, config = R.build(job)
    return E.PlainEngine(module, E.EngineConfig.from_deepspeed(config))


@pytest.mark.slow
@pytest.mark.parametrize("method,dtype,ga", [("full", "fp32", 2), ("lora", "bf16", 1), ("qlora", "bf16", 3)])
def test_loss_curve_matches_deepspeed_stage0(tmp_path, method, dtype, ga):
    path = _job_path(tmp_path, method, dtype, ga)
    out = tmp_path / "deepspeed.json"
    check(subprocess.run([sys.executable, "-m", "tests.engine_runs", str(path), str(out), "--neutralize-init-step"],
                         cwd=REPO, env=env(), capture_output=True, text=True, timeout=600))
    ds = R.Curve(**json.loads(out.read_text()))
    job = load_job(path, for_training=True)
    plain = R.run(_plain(job), job, STEPS)
    # DeepSpeed's own scheduler classes, stepped as its engine steps them: the same rates
    # (the first two 0.0: the rate set at construction, then warmup iteration 0)
    assert plain.lrs == ds.lrs and plain.lrs[:2] == [0.0, 0.0] and max(plain.lrs) > 0
    assert min(plain.grad_norms) > CLIP  # clipping is active at every step
    worst = max(abs(a - b) / abs(a) for a, b in zip(ds.losses, plain.losses))
    print(f"{method} {dtype} ga {ga}: max relative loss difference DeepSpeed vs PlainEngine {worst:.3g}")
    assert worst <= TOLERANCE[dtype], (ds.losses, plain.losses)
    assert plain.losses[-1] != plain.losses[0]  # it trained


@pytest.mark.parametrize("method,dtype,ga", [("full", "fp32", 2), ("qlora", "bf16", 2)])
def test_resume_continues_exactly(tmp_path, method, dtype, ga):
    """3 steps, checkpoint.save (the COMPLETE-marker protocol), a fresh model and engine,
    checkpoint.load, 3 more steps == 6 uninterrupted steps, bit for bit on the CPU."""
    job = load_job(_job_path(tmp_path, method, dtype, ga), for_training=True)
    whole_engine = _plain(job)
    whole = R.run(whole_engine, job, STEPS)

    first = _plain(job)
    head = R.run(first, job, 3)
    root = tmp_path / "checkpoints"
    C.save(first, root, 3, {"step": 3}, rank=0, world=1, strategy="single_gpu",
           global_batch=job.training.global_batch_size, barrier=lambda: None,
           exclude_frozen=method != "full")
    files = sorted(p.name for p in (root / C.tag_for(3)).iterdir())
    assert files == [C.MARKER, C.PLAIN_STATE_FILE, "rng_rank0.pt"]

    resumed = _plain(job)  # a fresh model: LoRA/full weights at their initial values again
    info = C.latest(root)
    assert info is not None and info.step == 3
    client = C.load(resumed, info, rank=0, world=1, strict=method == "full", seed=0)
    assert client == {"step": 3}
    assert resumed.global_steps == 3 and resumed.micro_steps == 3 * ga
    tail = R.run(resumed, job, STEPS - 3, first_step=3)

    assert head.losses + tail.losses == whole.losses
    assert head.lrs + tail.lrs == whole.lrs
    for a, b in zip(resumed.params, whole_engine.params):
        assert torch.equal(a, b)
    for a, b in zip(resumed.masters, whole_engine.masters):
        assert torch.equal(a, b)
    for a, b in zip(resumed.optimizer.state.values(), whole_engine.optimizer.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in ("step", "exp_avg", "exp_avg_sq"))


def test_lora_checkpoint_leaves_the_frozen_base_out(tmp_path):
    job = load_job(_job_path(tmp_path, "qlora", "bf16", 1), for_training=True)
    engine = _plain(job)
    engine.save_checkpoint(tmp_path, tag="t", client_state={}, save_latest=False, exclude_frozen_parameters=True)
    saved = torch.load(tmp_path / "t" / C.PLAIN_STATE_FILE, weights_only=True)
    assert sorted(saved["module"]) == sorted(engine.names) and all("lora_" in n for n in saved["module"])
    assert not (tmp_path / "latest").exists()
    engine.save_checkpoint(tmp_path, tag="all", client_state={}, save_latest=True, exclude_frozen_parameters=False)
    assert len(torch.load(tmp_path / "all" / C.PLAIN_STATE_FILE, weights_only=True)["module"]) > len(engine.names)
    assert (tmp_path / "latest").read_text() == "all"


def test_deepspeed_checkpoint_is_refused_in_one_line(tmp_path):
    job = load_job(_job_path(tmp_path, "lora", "fp32", 1), for_training=True)
    engine = _plain(job)
    (tmp_path / "step00000003").mkdir()
    (tmp_path / "step00000003" / "mp_rank_00_model_states.pt").write_bytes(b"x")  # stage 0-2
    with pytest.raises(C.CheckpointError, match=r"written by the DeepSpeed engine.*training.engine=deepspeed") as exc:
        engine.load_checkpoint(tmp_path, tag="step00000003")
    assert "\n" not in str(exc.value)
    assert engine.load_checkpoint(tmp_path, tag="step00000009") == (None, None)  # nothing there: DeepSpeed's answer
    assert C.written_by(tmp_path / "step00000003") == "deepspeed"
    (tmp_path / "z3").mkdir()
    (tmp_path / "z3" / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"x")
    assert C.written_by(tmp_path / "z3") == "deepspeed"
    engine.save_checkpoint(tmp_path, tag="mine", save_latest=False)
    assert C.written_by(tmp_path / "mine") == "plain" and C.written_by(tmp_path / "step00000009") is None


def test_checkpoint_of_another_model_is_refused(tmp_path):
    engine = _plain(load_job(_job_path(tmp_path, "lora", "fp32", 1), for_training=True))
    engine.save_checkpoint(tmp_path, tag="t", save_latest=False, exclude_frozen_parameters=True)
    other = _plain(load_job(tiny_job(tmp_path, "r4", method="lora", lora={"r": 4}), for_training=True))
    with pytest.raises(C.CheckpointError, match=r"trainable parameters \(names, shapes or dtype\) differ"):
        other.load_checkpoint(tmp_path, tag="t", load_module_strict=False)


def test_non_finite_gradient_skips_the_step(tmp_path):
    job = load_job(_job_path(tmp_path, "lora", "bf16", 1), for_training=True)
    engine = _plain(job)
    R.run(engine, job, 3)  # past warmup: a nonzero rate
    weights = [p.detach().clone() for p in engine.params]
    masters = [m.detach().clone() for m in engine.masters]
    lr = engine.get_lr()
    ids, pos, targets = R.batch(0, 0)
    loss = engine(ids, pos, targets, torch.tensor(float("nan")))
    engine.backward(loss)
    engine.step()
    assert engine.skipped_steps == 1 and engine.global_steps == 4
    assert engine.get_lr() == lr  # the scheduler did not step
    assert all(torch.equal(a, b) for a, b in zip(engine.params, weights))
    assert all(torch.equal(a, b) for a, b in zip(engine.masters, masters))
    assert all(p.grad is None for p in engine.params)


def test_accumulation_updates_only_at_the_boundary(tmp_path):
    job = load_job(_job_path(tmp_path, "lora", "fp32", 3), for_training=True)
    engine = _plain(job)
    R.run(engine, job, 3)
    before = [p.detach().clone() for p in engine.params]
    for micro in range(3):
        ids, pos, targets = R.batch(3, micro)
        engine.backward(engine(ids, pos, targets, torch.tensor(1.0)))
        engine.step()
        changed = any(not torch.equal(a, b) for a, b in zip(engine.params, before))
        assert changed == (micro == 2), micro
    assert engine.global_steps == 4 and engine.micro_steps == 12


def _config(tmp_path, strategy="single_gpu", **model):
    job = load_job(tiny_job(tmp_path, "cfg", model=model, hardware={"gpus_per_node": 1 if strategy == "single_gpu" else 2},
                            strategy=strategy))
    return build_ds_config(job, strategy, job.shape(), 6)


def test_engine_choice(tmp_path):
    bf16 = _config(tmp_path, dtype="bf16")
    assert E.choose_engine("auto", bf16) == "plain"
    assert E.choose_engine("plain", bf16) == "plain"
    assert E.choose_engine("deepspeed", bf16) == "deepspeed"
    assert E.choose_engine("auto", _config(tmp_path, dtype="fp32")) == "plain"
    fp16 = _config(tmp_path, dtype="fp16")
    assert E.choose_engine("auto", fp16) == "deepspeed"
    with pytest.raises(E.EngineError, match=r"^training.engine: plain cannot run this job: model.dtype fp16 needs dynamic loss scaling"):
        E.choose_engine("plain", fp16)
    zero2 = _config(tmp_path, strategy="zero2", dtype="bf16")
    assert E.choose_engine("auto", zero2) == "deepspeed"
    with pytest.raises(E.EngineError, match="ZeRO stage 2 partitions state"):
        E.choose_engine("plain", zero2)


def test_config_from_deepspeed(tmp_path):
    config = _config(tmp_path, dtype="bf16")
    c = E.EngineConfig.from_deepspeed(config)
    params = config["optimizer"]["params"]
    assert c.dtype == torch.bfloat16 and c.gradient_accumulation_steps == config["gradient_accumulation_steps"]
    assert (c.lr, list(c.betas), c.eps, c.weight_decay) == (params["lr"], params["betas"], params["eps"], params["weight_decay"])
    assert c.gradient_clipping == config["gradient_clipping"]
    assert c.scheduler_type == config["scheduler"]["type"] and dict(c.scheduler_params) == config["scheduler"]["params"]
    assert E.EngineConfig.from_deepspeed(_config(tmp_path, dtype="fp32")).dtype == torch.float32
