"""benchmarks/planner_quality.py on the CPU: a real tiny run of every feasible strategy, the pass rule, re-prediction.

The CPU tokens/s mean nothing (tiny-llama, fp32); the GPU results are in benchmarks/results/planner_quality.json.
"""

from __future__ import annotations

import json

from benchmarks import planner_quality as pq


def test_pass_rule():
    assert pq.judge("a", {"a": 95.0, "b": 100.0}) == {"fastest": "b", "pick_share": 0.95, "pass": True}
    assert pq.judge("a", {"a": 89.0, "b": 100.0})["pass"] is False
    # a failed run (None) is never the fastest; a failed pick cannot pass
    assert pq.judge("a", {"a": 50.0, "b": None}) == {"fastest": "a", "pick_share": 1.0, "pass": True}
    assert pq.judge("b", {"a": 50.0, "b": None})["pass"] is None


def test_tiny_run_and_repredict(tmp_path):
    out = tmp_path / "pq.json"
    assert pq.main(["--tiny", "--steps", "3", "--warmup", "1", "--out", str(out)]) == 0
    stored = json.loads(out.read_text())
    (row,) = stored["rows"]
    chosen, predicted = pq.planned(pq.TINY_JOBS[0], 3)
    assert row["chosen"] == chosen and set(row["strategies"]) == set(predicted) and len(predicted) >= 2
    assert all(s["returncode"] == 0 and s["tokens_per_s"] > 0 for s in row["strategies"].values())
    again = tmp_path / "again.json"
    assert pq.main(["--from-results", str(out), "--out", str(again)]) == 0
    (re,) = json.loads(again.read_text())["rows"]
    for s, side in re["strategies"].items():
        assert side["predicted_tokens_per_s_at_run"] == row["strategies"][s]["predicted_tokens_per_s"]
        assert side["tokens_per_s"] == row["strategies"][s]["tokens_per_s"]
