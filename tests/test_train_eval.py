"""Evaluation during training (orchestrator/evaluate.py and its two call sites in the trainer).

Real runs of the tiny Llama with LoRA on the CPU: one process (PlainEngine) and two (DeepSpeed ZeRO-2,
gloo). The eval split is data.eval_fraction 0.25 of the 48-line tiny data set (12 examples, 24 rows of
32 tokens, printed by the trainer), evaluated with micro batches of 3 rows, so micro batches hold
different numbers of loss tokens and the last ones of a rank are padding: a mean of per-batch means
would not be the eval loss.

Tolerances: the eval loss against the plain-loop reference (another batching, the HF model's own
logits instead of the chunked loss): measured 4.2e-8 relative -> REF_RTOL. 1 vs 2 processes: the
weights differ by the training's float reordering (tests/test_train_runs.py PARITY_RTOL) plus the
eval's; the same bound (not yet measured here: the 2-process run timed out while DeepSpeed's
shared-memory op was being rebuilt).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from orchestrator import cli
from orchestrator import data as D
from orchestrator import modeling as M
from orchestrator.compiler import RUN_JOB_FILE
from orchestrator.evaluate import EarlyStopping, Verdict
from orchestrator.spec import load_job
from tests.train_helpers import check, evals, metrics, out_dir, run_trainer, stopped_copy, summary, tiny_job

REF_RTOL = 1e-5
PARITY_RTOL = 1e-5
EVAL = {"method": "lora", "data": {"eval_fraction": 0.25},
        "training": {"eval_every": 2, "max_steps": 4, "eval_micro_batch_size": 3}}


def _run(tmp_path_factory, name: str, nprocs: int, **sections) -> Path:
    folder = tmp_path_factory.mktemp(name)
    job = tiny_job(folder, name, **sections)
    proc = run_trainer(job, nprocs)
    check(proc)
    return job


@pytest.fixture(scope="module")
def lora_1(tmp_path_factory):
    return _run(tmp_path_factory, "ev1", 1, logging={"wandb_mode": "offline"}, **EVAL)


@pytest.fixture(scope="module")
def lora_z2(tmp_path_factory):
    return _run(tmp_path_factory, "evz2", 2, strategy="zero2", **EVAL)


def reference_eval_loss(run: Path) -> tuple[float, int]:
    """(eval loss, loss tokens) of the run's final model by a plain loop: the trainer's model rebuilt with the
    adapter it wrote, each eval row alone through the HF model's own logits, token losses summed in
    float64 and divided once by the loss tokens."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    job = load_job(run / RUN_JOB_FILE, check_paths=False)
    rows = D.tokenize_all(job, D.load_tokenizer(job, job.shape().vocab_size)).eval
    loaded = M.load_model(job, "single_gpu", torch.device("cpu"), job.training.seed)
    assert not set_peft_model_state_dict(loaded.model, load_file(run / "adapter" / "adapter_model.safetensors")).unexpected_keys
    loaded.model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(rows.n):
            logits = loaded.base(input_ids=torch.from_numpy(rows.input_ids[i:i + 1]),
                                 position_ids=torch.from_numpy(rows.position_ids[i:i + 1])).logits[0]
            targets = torch.from_numpy(rows.targets[i])
            total += float(torch.nn.functional.cross_entropy(logits.float(), targets, ignore_index=D.IGNORE, reduction="sum"))
            tokens += int((targets != D.IGNORE).sum())
    return total / tokens, tokens


def test_eval_loss_is_the_plain_loop_over_the_split(lora_1):
    out = out_dir(lora_1)
    lines = evals(out)
    assert [r["step"] for r in lines] == [2, 4]  # eval_every 2; the end (step 4) is not evaluated twice
    want, tokens = reference_eval_loss(out)  # the adapter is the final (step 4) one
    print(f"eval loss {lines[-1]['eval_loss']!r} vs plain loop {want!r}: rel {abs(lines[-1]['eval_loss'] / want - 1):.2g}")
    assert lines[-1]["eval_loss"] == pytest.approx(want, rel=REF_RTOL)
    assert all(r["eval_tokens"] == tokens for r in lines)  # every eval row once, padding rows add none
    assert all(r["eval_ppl"] == pytest.approx(math.exp(r["eval_loss"]), rel=1e-12) for r in lines)


def test_summary_and_metrics_carry_the_evals_and_the_best_checkpoint(lora_1, capsys):
    out = out_dir(lora_1)
    first, last = evals(out)
    assert last["eval_loss"] < first["eval_loss"]  # measured 6.117 -> 5.958: each eval is a new best
    s = summary(out)
    assert (s["eval_loss"], s["eval_ppl"], s["eval_step"]) == (last["eval_loss"], last["eval_ppl"], 4)
    assert (s["best_eval_loss"], s["best_step"], s["best_checkpoint"], s["early_stopped"]) == \
        (last["eval_loss"], 4, "step00000004", False)
    # save_every is 0: the new best at step 2 was checkpointed for being one (else only step 4 would be)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step00000002", "step00000004"]
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]  # the training lines are unchanged
    run = next(out.glob("wandb/offline-run-*/run-*.wandb"))
    assert b"eval_loss" in run.read_bytes() and b"best_eval_loss" in run.read_bytes()
    assert cli.main(["status", str(out)]) == 0
    shown = capsys.readouterr().out
    assert f"eval loss {last['eval_loss']:.4f} (step 4)" in shown and "finished" in shown


def test_eval_loss_is_the_same_on_2_processes(lora_1, lora_z2):
    one, two = evals(out_dir(lora_1)), evals(out_dir(lora_z2))
    assert [r["step"] for r in one] == [r["step"] for r in two] == [2, 4]
    for a, b in zip(one, two):
        print(f"step {a['step']}: 1 process {a['eval_loss']!r}, 2 processes {b['eval_loss']!r}: "
              f"rel {abs(a['eval_loss'] / b['eval_loss'] - 1):.2g}")
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=PARITY_RTOL)
        assert b["eval_tokens"] == a["eval_tokens"]
    assert len(metrics(out_dir(lora_z2), rank=1)) == 4  # rank 1 trained; only rank 0 writes eval lines


def test_early_stopping_ends_training_with_a_checkpoint(tmp_path, capsys):
    # lr 1e-30: every Adam update (|update| <= lr x ~1) is far below a float32 ulp of the weights, so the
    # weights never change and every eval loss equals the first: with patience 1 the second eval stops.
    job = tiny_job(tmp_path, "es", method="lora", data={"eval_fraction": 0.25},
                   training={"lr": 1e-30, "eval_every": 1, "early_stopping_patience": 1, "max_steps": 6},
                   logging={"wandb_mode": "disabled", "log_every": 1})
    proc = run_trainer(job)
    check(proc)
    out = out_dir(job)
    lines = evals(out)
    assert [r["step"] for r in lines] == [1, 2] and lines[0]["eval_loss"] == lines[1]["eval_loss"]
    assert "orch: early stopping at step 2: eval loss not below" in proc.stderr
    s = summary(out)
    assert (s["steps"], s["best_step"], s["best_checkpoint"], s["early_stopped"]) == (2, 1, "step00000001", True)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step00000001", "step00000002"]
    assert [r["step"] for r in metrics(out)] == [1, 2]
    assert cli.main(["status", str(out)]) == 0
    assert "step 2 / 6 (33 %), finished" in capsys.readouterr().out  # stopped early, not cut off


def test_resume_goes_on_with_the_best_eval_and_an_early_stopped_run_stays_finished(tmp_path):
    # lr 1e-30 as above: every eval loss equals the first, so step 1 stays the best and patience 3 stops at step 4.
    job = tiny_job(tmp_path, "esr", method="lora", data={"eval_fraction": 0.25},
                   training={"lr": 1e-30, "eval_every": 1, "early_stopping_patience": 3, "max_steps": 8, "save_every": 2},
                   logging={"wandb_mode": "disabled", "log_every": 1})
    check(run_trainer(job))
    whole = summary(out_dir(job))
    assert (whole["steps"], whole["best_step"], whole["early_stopped"]) == (4, 1, True)

    again = run_trainer(job, args=("--resume",))  # over by early stopping: nothing to train
    check(again)
    assert "is already finished (early stopping ended it at step 4" in again.stderr
    assert summary(out_dir(job)) == whole

    cut = stopped_copy(job, tmp_path / "cut", after_step=2)
    proc = run_trainer(cut, args=("--resume",))
    check(proc)
    resumed = summary(out_dir(cut))
    # the evals of steps 3 and 4 are the 2nd and 3rd without a new best (not a new best and its first miss)
    assert [r["step"] for r in evals(out_dir(cut))] == [3, 4]
    for key in ("steps", "best_step", "best_eval_loss", "best_checkpoint", "early_stopped"):
        assert resumed[key] == whole[key], key


def test_early_stopping_decides_new_best_and_stop():
    losses = [3.0, 2.5, 2.6, 2.4, 2.45, 2.5, 2.0]
    rule = EarlyStopping(patience=2)
    verdicts = [rule.update(step, loss) for step, loss in enumerate(losses, start=1)]
    best, worse = Verdict(new_best=True, stop=False), Verdict(new_best=False, stop=False)
    # 2.4 at step 4 is the best; 2.45 and 2.5 are the 2 evals without a lower loss: stop at step 6
    assert verdicts == [best, best, worse, best, worse, Verdict(new_best=False, stop=True), best]
    assert (rule.best_loss, rule.best_step) == (2.0, 7)
    never = EarlyStopping(patience=None)
    assert not any(never.update(s, 1.0).stop for s in range(10))
    delta = EarlyStopping(patience=1, min_delta=0.1)
    assert delta.update(1, 2.5).new_best and delta.update(2, 2.45) == Verdict(new_best=False, stop=True)
    assert delta.best_loss == 2.5  # 0.05 lower is not lower by more than min_delta
