"""Dataset mixing through the real trainer (1 CPU process, tiny model): the mixture printed at the
start, recorded per log step in metrics.jsonl and in summary.json is the one the batches hold."""

from __future__ import annotations

import json

from orchestrator import data as D
from orchestrator.spec import load_job
from tests.train_helpers import check, metrics, run_trainer, summary, tiny_job


def _lines(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def test_trainer_reports_the_mixture_it_trained_on(tmp_path):
    a = _lines(tmp_path / "a.jsonl", [f"short {i}" for i in range(12)])
    b = _lines(tmp_path / "b.jsonl", [f"a longer line of text, number {i}" for i in range(40)])
    job = tiny_job(tmp_path, "mix", data={"paths": None, "sources": [{"path": a, "weight": 3}, {"path": b, "weight": 1}],
                                          "eval_fraction": 0.25},
                   training={"max_steps": 5, "save_every": 0}, logging={"wandb_mode": "disabled", "log_every": 2})
    proc = run_trainer(job)
    check(proc)
    spec = load_job(job)
    out = spec.output_dir()

    # The expected counts, computed here from the same pure functions of (seed, weights, sizes):
    # 12 - floor(0.25 x 12) = 9 and 40 - 10 = 30 training examples, N = 39: a gets 39 x 3/4 = 29.25 -> 29,
    # b 9.75 -> 10 (the leftover example goes to the larger remainder, .75 vs .25)
    data = D.tokenize_all(spec, D.byte_tokenizer())
    assert [(d.available, d.per_epoch, d.held_out) for d in data.draws] == [(9, 29, 3), (30, 10, 10)]
    batcher = D.Batcher(data.train, 42, 2, 4, 1)  # seed 42 (default), micro batch 2, accumulation 4, 1 rank
    planned = D.mixture(spec.data.train_sources(), batcher.source_counts(5))
    trained = summary(out)["mixture"]
    assert [(s["name"], s["tokens"], s["loss_tokens"], s["examples"]) for s in trained] == \
        [(p.name, p.tokens, p.loss_tokens, p.examples) for p in planned]
    assert sum(s["tokens"] for s in trained) == int(data.train.source_tokens[
        [i for s in range(5) for i in batcher.step_rows(s)]].sum())
    line = next(x for x in proc.stderr.splitlines() if x.startswith("orch: mixture: "))
    assert line == f"orch: {D.render_mixture(planned)} (the 5 steps planned)"
    assert "orch: eval: " in proc.stderr and "(data.eval_fraction 0.25: 13 examples held out)" in proc.stderr
    # metrics.jsonl: tokens per source so far at each log step (2, 4 and the last, 5)
    logged = {r["step"]: r["source_tokens"] for r in metrics(out)}
    assert sorted(logged) == [2, 4, 5]
    for step, tokens in logged.items():
        assert tokens == {s.name: s.tokens for s in D.mixture(spec.data.train_sources(), batcher.source_counts(step))}
