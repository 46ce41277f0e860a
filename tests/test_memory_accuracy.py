"""The accuracy harness's CPU paths: config set, comparison columns, re-rendering stored results, fitting.

The GPU measurements come from the lead's runs; here the "measured" values are
SYNTHETIC (predicted x a known factor), only to check the harness arithmetic.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from orchestrator import levers

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("memory_accuracy", ROOT / "benchmarks/memory_accuracy.py")
acc = importlib.util.module_from_spec(spec)
sys.modules["memory_accuracy"] = acc
spec.loader.exec_module(acc)  # type: ignore[union-attr]


def test_config_set_covers_the_brief():
    names = [c.name for c in acc.CONFIGS]
    assert len(names) == len(set(names)) >= 14
    assert {c.role for c in acc.CONFIGS} == {"calibration", "held_out"}
    strategies = {c.strategy for c in acc.CONFIGS}
    assert {"single_gpu", "zero2", "zero3", "zero3_offload_optimizer", "zero3_offload_all"} <= strategies
    jobs = {c.name: acc.make_job(c, Path("/tmp/x"), Path("/tmp/x.jsonl")) for c in acc.CONFIGS}
    models = {j.model.name for j in jobs.values() if j.method == "qlora" and j.hardware.world_size == 1}
    assert {"llama3-1b", "llama3-8b", "llama2-13b", "llama3-70b"} <= models
    assert any(j.method == "qlora" and c.strategy == "zero3" for c, j in zip(acc.CONFIGS, jobs.values()))
    mbs = {j.training.micro_batch_size for j in jobs.values()}
    seqs = {j.data.seq_len for j in jobs.values()}
    ranks = {j.lora.r for j in jobs.values() if j.method != "full"}
    assert min(mbs) == 1 and max(mbs) == 8 and min(seqs) == 512 and max(seqs) == 8192
    assert min(ranks) == 8 and max(ranks) == 64
    assert {j.training.gradient_checkpointing for j in jobs.values()} == {True, False}
    for c, j in zip(acc.CONFIGS, jobs.values()):
        assert j.strategy == c.strategy and j.hardware.world_size == c.gpus and j.grad_accum() == 1


def test_comparison_columns():
    cfg = next(c for c in acc.CONFIGS if c.name == "full-8b-zero3")
    job = acc.make_job(cfg, Path("/tmp/x"), Path("/tmp/x.jsonl"))
    n = job.shape().num_params()
    # rule of thumb: 16 B/param over 2 GPUs under ZeRO-3
    assert acc.rule_of_thumb(job, "zero3") == int(n * 16 / 2)
    # DeepSpeed's real estimator (imports deepspeed): ZeRO-2 = 2N + 18N/W; ZeRO-3 = 4 x largest + 18N/W
    assert acc.deepspeed_estimate(job, "zero2") == 2 * n + int(18 * n / 2)
    largest = 128256 * 4096  # embedding
    assert acc.deepspeed_estimate(job, "zero3") == 4 * largest + int(18 * n / 2)


def test_from_results_and_fit(tmp_path):
    # SYNTHETIC measurements: predicted x 1.1 everywhere -> every error is 1/1.1 - 1 = -9.09 %;
    # load peaks x 1.25 -> every load error is 1/1.25 - 1 = -20 %
    rows = []
    for c in acc.CONFIGS:
        job = acc.make_job(c, Path("/tmp/x"), Path("/tmp/x.jsonl"))
        row = {"config": c.name, "role": c.role, "strategy": c.strategy, "gpus": c.gpus, "overrides": list(c.overrides)}
        row.update(acc.predict_row(c, job))
        # what a run records from summary.json: the levers it used (here: what the planner resolves for a GPU)
        used = levers.resolve(job, c.strategy, job.shape())
        row.update(engine=used.engine, compiled_variants=1 if used.compile else None, attention=used.attention)
        row["measured_peak_bytes"] = int(row["predicted_peak_bytes"] * 1.1)
        row["measured_load_peak_bytes"] = int(row["predicted_load_peak_bytes"] * 1.25)
        rows.append(row)
    stored = tmp_path / "stored.json"
    stored.write_text(json.dumps({"date": "synthetic", "device": "synthetic", "rows": rows}))
    out = tmp_path / "re.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks/memory_accuracy.py"), "--from-results", str(stored),
                          "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    data = json.loads(out.read_text())
    assert all(abs(r["error_pct"] + 9.09) < 0.01 for r in data["rows"])
    assert data["summary"]["all"]["median_abs_pct"] == 9.09
    assert all(abs(r["load_error_pct"] + 20.0) < 0.01 for r in data["rows"])
    assert data["summary"]["load_peak"]["median_abs_pct"] == 20.0
    md = out.with_suffix(".md").read_text()
    assert "| qlora-70b-s1024 | calibration |" in md
    assert "| load pred. | load meas. | load error % |" in md
    assert "| -20.0 |" in md.split("| qlora-70b-s1024 |")[1].splitlines()[0]
    assert f"| orch load peak | {len(acc.CONFIGS)} | 20.0 | 20.0 |" in md  # every config has a row
    # fitting only on calibration rows must reduce their error
    fit = subprocess.run([sys.executable, str(ROOT / "benchmarks/memory_accuracy.py"), "--from-results", str(stored),
                          "--fit"], capture_output=True, text=True, env=env, timeout=300)
    assert fit.returncode == 0, fit.stderr
    line = next(x for x in fit.stdout.splitlines() if x.startswith("calibration rows:"))
    assert float(line.split("median |err| ")[1].split(" %")[0]) < 9.09


def test_merge_results_keeps_measured_rows_in_config_order():
    a, b, c = (cfg.name for cfg in acc.CONFIGS[:3])
    first = {"device": "H100", "date": "2026-11-23T10:00:00", "rows": [
        {"config": b, "measured_peak_bytes": 100}, {"config": a, "measured_peak_bytes": None}]}
    second = {"device": "H100", "date": "2026-11-24T10:00:00", "rows": [
        {"config": b, "measured_peak_bytes": None}, {"config": a, "measured_peak_bytes": 7},
        {"config": c, "measured_peak_bytes": 9}]}
    meta, rows = acc.merge_results([first, second])
    assert [r["config"] for r in rows] == [a, b, c]
    # a later failure never hides a measurement; a later measurement replaces a failure
    assert [r["measured_peak_bytes"] for r in rows] == [7, 100, 9]
    assert meta == {"device": "H100", "date": "2026-11-23, 2026-11-24"}


def test_rows_measured_before_the_levers_repredict_as_they_ran(tmp_path):
    # benchmarks/results/device/h100-call1..3 ran DeepSpeed's engine, eager layers and sdpa (eager where the
    # overrides say so) and recorded none of it; today's auto resolves to PlainEngine and flex attention.
    # Re-rendered, they must give exactly the predictions stored with them (common.job_as_ran).
    calls = [ROOT / f"benchmarks/results/device/h100-call{i}/memory_accuracy.json" for i in (1, 2, 3)]
    out = tmp_path / "re.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks/memory_accuracy.py"), "--from-results", *map(str, calls),
                          "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    stored = {r["config"]: r for r in json.loads((ROOT / "benchmarks/results/memory_accuracy.json").read_text())["rows"]}
    again = json.loads(out.read_text())["rows"]
    assert len(again) == 12
    for r in again:
        assert (r["predicted_peak_bytes"], r["predicted_load_peak_bytes"]) == \
            (stored[r["config"]]["predicted_peak_bytes"], stored[r["config"]]["predicted_load_peak_bytes"]), r["config"]
