"""Data pipeline of the trainer: tokenizer, masking, packing, batches (real tokenizers/datasets, no mocks)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from orchestrator import data as D
from orchestrator import datacheck
from orchestrator.spec import load_job
from tests.train_helpers import tiny_job


def test_byte_tokenizer_roundtrip_and_ids_fit_vocab():
    tok = D.byte_tokenizer()
    text = "héllo wörld\n\t{}"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert len(ids) == len(text.encode("utf-8"))  # one token per byte
    specials = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    assert len(specials) == 3 and max(specials) == 258 and len(tok) == 259


def test_packing_restarts_positions_and_never_targets_across_examples():
    a, b = [10, 11, 12, 13, 14], [20, 21, 22, 23]
    rows = D.build_rows([(a, [1] * 5), (b, [1] * 4)], seq_len=12, packing=True, pad_id=0)
    assert rows.n == 1
    assert rows.input_ids[0].tolist() == a + b + [0, 0, 0]
    assert rows.position_ids[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2]
    I = D.IGNORE
    # target of token t is token t+1 of the same example; the last token of a does not predict b's first
    assert rows.targets[0].tolist() == [11, 12, 13, 14, I, 21, 22, 23, I, I, I, I]
    unpacked = D.build_rows([(a, [1] * 5), (b, [1] * 4)], seq_len=12, packing=False, pad_id=0)
    assert unpacked.n == 2


def _decoded_targets(tok, rows) -> list[str]:
    out = []
    for r in range(rows.n):
        t = rows.targets[r]
        out.append(tok.decode(t[t != D.IGNORE].tolist()))
    return out


def test_alpaca_prompt_is_masked(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"instruction": "Add the numbers.", "input": "2 and 3", "output": "five"}) + "\n")
    job = load_job(tiny_job(tmp_path, "a", data={"paths": [str(path)], "format": "alpaca", "seq_len": 128}))
    tok = D.byte_tokenizer()
    rows = D.tokenize_all(job, tok)
    assert _decoded_targets(tok, rows) == ["five<|eos|>"]
    assert "Add the numbers." in tok.decode(rows.input_ids[0].tolist())


def test_chat_only_assistant_turns_in_loss(tmp_path):
    path = tmp_path / "c.jsonl"
    msgs = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+3?"},
            {"role": "assistant", "content": "5"}, {"role": "user", "content": "and 2+2?"},
            {"role": "assistant", "content": "4"}]
    path.write_text(json.dumps({"messages": msgs}) + "\n")
    job = load_job(tiny_job(tmp_path, "c", data={"paths": [str(path)], "format": "chat", "seq_len": 256}))
    tok = D.byte_tokenizer()
    rows = D.tokenize_all(job, tok)
    # template: "<|role|>\ncontent\n" per message; the loss sees the assistant contents (+ their newline) and eos
    assert _decoded_targets(tok, rows) == ["5\n4\n<|eos|>"]
    nomask = load_job(tiny_job(tmp_path, "c2", data={"paths": [str(path)], "format": "chat", "seq_len": 256, "mask_prompt": False}))
    full = D.tokenize_all(nomask, tok)
    assert "Be terse." in _decoded_targets(tok, full)[0]


def test_batches_same_global_batch_for_any_world_size(tmp_path):
    job = load_job(tiny_job(tmp_path, "b"))
    tok = D.byte_tokenizer()
    rows = D.tokenize_all(job, tok)
    one = D.Batcher(rows, seed=3, micro_batch=2, grad_accum=4, world=1)
    two = D.Batcher(rows, seed=3, micro_batch=2, grad_accum=2, world=2)
    for step in (0, 1, 7, 50):  # 50 wraps into later epochs
        a = sorted(np.concatenate([one.micro_rows(step, m, 0) for m in range(4)]).tolist())
        b = sorted(np.concatenate([two.micro_rows(step, m, r) for m in range(2) for r in range(2)]).tolist())
        assert a == b == sorted(one.step_rows(step).tolist())
        assert one.step_loss_tokens(step) == two.step_loss_tokens(step) == int(rows.loss_tokens()[one.step_rows(step)].sum())
    # a new epoch is a different permutation; the same seed gives the same order
    assert D.Batcher(rows, 3, 2, 4, 1).step_rows(2).tolist() == one.step_rows(2).tolist()
    assert D.Batcher(rows, 4, 2, 4, 1).step_rows(2).tolist() != one.step_rows(2).tolist()


def test_cache_is_reused_and_keyed_on_seq_len(tmp_path):
    job = load_job(tiny_job(tmp_path, "k"))
    tok = D.byte_tokenizer()
    cache = tmp_path / "cache"
    first = D.prepare_rows(job, tok, cache, True, lambda: None)
    files = list(cache.glob("*.npz"))
    assert len(files) == 1
    again = D.prepare_rows(job, tok, cache, True, lambda: None)
    assert np.array_equal(first.input_ids, again.input_ids) and list(cache.glob("*.npz")) == files
    longer = load_job(tiny_job(tmp_path, "k2", data={"seq_len": 64}))
    D.prepare_rows(longer, tok, cache, True, lambda: None)
    assert len(list(cache.glob("*.npz"))) == 2


def test_bad_row_is_a_one_line_error(tmp_path):
    # `orch validate` checks the first rows (orchestrator/datacheck.py); a bad row further down is
    # found by the trainer, with the same message (datacheck.row_problem).
    good = [json.dumps({"text": "fine"})] * datacheck.FIRST_ROWS
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(good + [json.dumps({"txt": "no text field"})]) + "\n")
    job = load_job(tiny_job(tmp_path, "bad", data={"paths": [str(path)]}))
    with pytest.raises(D.DataError, match=f"data row {datacheck.FIRST_ROWS}: format 'text' needs a string field 'text'"):
        D.tokenize_all(job, D.byte_tokenizer())
