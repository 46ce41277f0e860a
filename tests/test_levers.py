"""The speed levers resolve in one place (orchestrator/levers.py), the same way for the planner and the trainer.

The attention kernel per family and device, the engine per strategy and dtype, compiled layers per device and
ZeRO stage; the trainer's side (modeling.attn_implementation, engine.choose_engine on the DeepSpeed config it
is given, speedups.compile_wanted) gives the same answers as the planner's, on both sides of the CUDA switch.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from orchestrator import engine as E
from orchestrator import levers
from orchestrator import modeling as M
from orchestrator import speedups as S
from orchestrator.catalog import PRESETS, ModelShape
from orchestrator.deepspeed_config import build_ds_config
from orchestrator.spec import load_job
from orchestrator.strategy import STRATEGIES

ROOT = Path(__file__).resolve().parents[1]


def job(*overrides: str):
    return load_job(ROOT / "jobs/llama8b_qlora_24gb.yaml", list(overrides), check_paths=False)


@pytest.mark.parametrize("preset, cuda, packing, want", [
    ("llama3-8b", True, True, "flex_attention"),  # packed rows on a GPU: no dense block mask
    ("llama3-8b", True, False, "sdpa"),  # one example per row: sdpa's is_causal flash kernel, no mask
    ("llama3-8b", False, True, "sdpa"),  # the CPU has no flex backward
    ("qwen2.5-7b", True, True, "flex_attention"),  # 28 heads: flex expands k/v, still no dense mask
    ("phi3-mini", True, True, "flex_attention"),  # head_dim 96, sliding window as a mask function
    ("gemma2-9b", True, True, "eager"),  # head_dim 256 (levers.FLEX_MAX_HEAD_DIM); no sdpa (soft-capping)
    ("gemma2-9b", False, True, "eager"),
    ("gemma3-12b", True, True, "sdpa"),  # head_dim 256: its sdpa kernel
])
def test_auto_attention_per_family_and_device(preset, cuda, packing, want):
    j = job(f"model.name={preset}", f"data.packing={str(packing).lower()}")
    assert levers.attention(j, PRESETS[preset], cuda=cuda) == want


def test_explicit_attention_stays_and_flex_needs_head_dim_128_at_most():
    for kernel in ("sdpa", "eager", "flex_attention", "flash_attention_2"):
        assert levers.attention(job(f"model.attn_implementation={kernel}"), PRESETS["llama3-8b"], cuda=False) == kernel
    # a Llama-like shape with head_dim 256 (8 heads on 2048): auto keeps sdpa, explicit flex is flex
    wide = ModelShape("llama", 2048, 8192, 2, 8, 8, 512, head_dim=256)
    assert levers.attention(job(), wide) == "sdpa"
    assert levers.attention(job("model.attn_implementation=flex_attention"), wide) == "flex_attention"


@pytest.mark.parametrize("cuda", [False, True])
@pytest.mark.parametrize("preset", ["llama3-8b", "gemma2-9b"])
def test_trainer_resolves_attention_like_the_planner(monkeypatch, cuda, preset):
    # modeling.attn_implementation is the trainer's side: it asks torch which device it has; both sides of
    # that switch are forced here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    j = job(f"model.name={preset}")
    assert M.attn_implementation(j) == levers.attention(j, j.shape(), cuda=cuda)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("setting", ["auto", "deepspeed", "plain"])
def test_engine_from_the_spec_is_the_trainers_choice_from_its_deepspeed_config(strategy, dtype, setting):
    # the planner decides from the spec (EngineFacts.of_job), the trainer from the DeepSpeed config it is given
    # (EngineFacts.of_deepspeed): same answers, same errors, for every strategy, dtype and setting
    gpus = 1 if STRATEGIES[strategy].zero_stage == 0 else 2
    j = job(f"model.dtype={dtype}", f"quantization.compute_dtype={dtype}", "hardware.gpu=A100-80GB",
            f"hardware.gpus_per_node={gpus}", "hardware.nvme_path=/tmp", "quantization.storage_dtype=" + dtype,
            "training.micro_batch_size=1", "training.gradient_checkpointing=true")  # any fixed knobs: a config needs them
    config = build_ds_config(j, strategy, j.shape(), 10)
    j = j.model_copy(update={"training": j.training.model_copy(update={"engine": setting})})
    try:
        planned = levers.engine(j, strategy)
    except levers.EngineError as exc:
        with pytest.raises(E.EngineError, match="^training.engine: plain cannot run this job") as trainer:
            E.choose_engine(setting, config)
        assert str(trainer.value) == str(exc)
        return
    assert E.choose_engine(setting, config) == planned
    want = "plain" if setting != "deepspeed" and strategy == "single_gpu" and dtype != "fp16" else "deepspeed"
    assert planned == want


def test_compile_resolves_like_the_trainer():
    for setting in ("auto", True, False):
        for cuda in (False, True):
            for stage in (0, 2, 3):
                device = torch.device("cuda", 0) if cuda else torch.device("cpu")
                assert S.compile_wanted(setting, device, stage) == levers.compile_wanted(setting, cuda, stage)
    assert levers.compiled(job(), "single_gpu") and not levers.compiled(job(), "single_gpu", cuda=False)
    assert not levers.compiled(job(), "zero3_offload_optimizer")  # ZeRO-3's gather hooks run inside the layers
    assert levers.resolve(job(), "single_gpu", PRESETS["llama3-8b"]) == levers.Levers("plain", True, "flex_attention")


def test_plan_shows_the_levers(capsys):
    from orchestrator import planner

    result = planner.plan(job())
    chosen = next(c for c in result.candidates if c.strategy == result.chosen)
    assert chosen.levers == levers.Levers("plain", True, "flex_attention")
    assert "levers: PlainEngine, compiled decoder layers, attention flex_attention" in planner.render_table(job(), result)
    row = planner.plan_json(job(), result)["candidates"][0]
    assert (row["engine"], row["compile"], row["attention"]) == ("plain", True, "flex_attention")
    # ZeRO-3 keeps DeepSpeed's engine and eager layers
    z3 = next(c for c in result.candidates if c.strategy == "zero3_offload_optimizer")
    assert z3.levers == levers.Levers("deepspeed", False, "flex_attention")
    # training.engine plain leaves only the strategies PlainEngine runs
    assert planner.valid_strategies(job("training.engine=plain")) == ["single_gpu"]
