"""benchmarks/knob_grid.py on the CPU: the tiny job's whole grid in one process (one model build), an
out-of-memory that ends only its point, the verdict's arithmetic, and speed_fit reading the results.

The CPU's tokens/s mean nothing (tiny-llama, fp32); no assertion depends on them.
"""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import inprocess as P
from benchmarks import knob_grid as kg
from benchmarks import speed_fit as fit


def test_tiny_grid_one_model_build_every_point(tmp_path, monkeypatch):
    builds = []
    real_build = P.build
    monkeypatch.setattr(P, "build", lambda *a, **k: builds.append(1) or real_build(*a, **k))
    out = tmp_path / "grid.json"
    assert kg.main(["--tiny", "--steps", "2", "--out", str(out)]) == 0
    assert builds == [1]
    (row,) = json.loads(out.read_text())["rows"]
    # global batch 4 on one GPU: micro batch 1, 2, 4, checkpointing on and off; the choice first, then mb 1 + ckpt
    choice = (row["choice"]["micro_batch_size"], row["choice"]["gradient_checkpointing"])
    got = [(p["micro_batch_size"], p["gradient_checkpointing"]) for p in row["points"]]
    assert got[:2] == [choice, (1, True)] and sorted(got) == sorted({(m, c) for m in (1, 2, 4) for c in (False, True)})
    for p in row["points"]:
        assert p["tokens_per_s"] > 0 and p["oom"] is False and len(p["step_times"]) == 2
        assert (p["engine"], p["attention"], p["compiled_variants"]) == ("plain", "sdpa", None)  # CPU: no compile
    assert row["levers"] == {"engine": "plain", "compile": False, "attention": "sdpa"}
    assert row["verdict"]["choice_ran"] is True and "choice_over_fastest" in row["verdict"]
    assert "| micro batch | checkpointing |" in out.with_suffix(".md").read_text()
    # the speed model can be re-fitted on the points: each as it ran (PlainEngine, eager layers, sdpa)
    measured = fit.load(out)
    assert len(measured) == 6
    assert {(m.job.training.micro_batch_size, m.job.training.gradient_checkpointing) for m in measured} == set(got)
    assert all((m.job.training.engine, m.job.training.compile, m.job.model.attn_implementation) ==
               ("plain", False, "sdpa") for m in measured)


def test_out_of_memory_ends_only_its_point_and_skips_larger_ones(tmp_path):
    # SIMULATED out-of-memory (the CPU has no allocator limit): micro batch 2 or more with checkpointing on
    def step(model, eng, batcher, n):
        if batcher.micro_batch >= 2 and model.loaded.base.model.layers[0].gradient_checkpointing:
            raise torch.cuda.OutOfMemoryError("simulated")
        P.optimizer_step(model, eng, batcher, n)

    out = tmp_path / "grid.json"
    row = kg.run_job(kg.grid_job("tiny-qlora-cpu"), 2, 1, out, {}, everything=True, step_fn=step)
    by_point = {(p["micro_batch_size"], p["gradient_checkpointing"]): p for p in row["points"]}
    assert by_point[(2, True)]["oom"] is True and by_point[(2, True)]["tokens_per_s"] is None
    assert by_point[(4, True)]["skipped"] == "micro batch 2 ran out of memory"  # memory grows with the micro batch
    assert all(by_point[(m, False)]["tokens_per_s"] > 0 for m in (1, 2, 4))  # the others still ran
    assert by_point[(1, True)]["tokens_per_s"] > 0
    assert json.loads(out.read_text())["rows"][0]["points"] == row["points"]


def _points(*rows):
    return [{"micro_batch_size": m, "gradient_checkpointing": c, "tokens_per_s": t} for m, c, t in rows]


def test_verdict_arithmetic():
    choice = kg.Point(8, True)
    # 900 / 1000 = 0.9: within 10 % of the fastest; 899 is not
    assert kg.verdict(choice, _points((8, True, 900.0), (4, False, 1000.0)), None)["passed"] is True
    assert kg.verdict(choice, _points((8, True, 899.0), (4, False, 1000.0)), None)["passed"] is False
    # the 24 GiB job: at least 1.5 x micro batch 1 with checkpointing (1500 / 1000)
    v = kg.verdict(choice, _points((8, True, 1500.0), (1, True, 1000.0)), 1.5)
    assert (v["passed"], v["choice_over_hand_set"], v["choice_over_fastest"]) == (True, 1.5, 1.0)
    assert kg.verdict(choice, _points((8, True, 1499.0), (1, True, 1000.0)), 1.5)["passed"] is False
    # a choice that ran out of memory fails whatever else ran
    oom = kg.verdict(choice, _points((8, True, None), (1, True, 1000.0)), None)
    assert (oom["choice_ran"], oom["passed"]) == (False, False)


def test_points_option():
    assert kg.parse_points("8:on,1:off") == [kg.Point(8, True), kg.Point(1, False)]
    with pytest.raises(ValueError, match="--points: '8' is not MICRO:on or MICRO:off"):
        kg.parse_points("8")
