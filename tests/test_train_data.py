"""Data pipeline of the trainer: tokenizer, masking, packing, batches (real tokenizers/datasets, no mocks)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from orchestrator import data as D
from orchestrator import datacheck
from orchestrator.spec import DataFile, DataSource, load_job
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
    rows = D.build_rows([D.Piece(a, [1] * 5), D.Piece(b, [1] * 4)], seq_len=12, packing=True, pad_id=0)
    assert rows.n == 1
    assert rows.input_ids[0].tolist() == a + b + [0, 0, 0]
    assert rows.position_ids[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2]
    I = D.IGNORE
    # target of token t is token t+1 of the same example; the last token of a does not predict b's first
    assert rows.targets[0].tolist() == [11, 12, 13, 14, I, 21, 22, 23, I, I, I, I]
    unpacked = D.build_rows([D.Piece(a, [1] * 5), D.Piece(b, [1] * 4)], seq_len=12, packing=False, pad_id=0)
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
    rows = D.tokenize_all(job, tok).train
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
    rows = D.tokenize_all(job, tok).train
    # template: "<|role|>\ncontent\n" per message; the loss sees the assistant contents (+ their newline) and eos
    assert _decoded_targets(tok, rows) == ["5\n4\n<|eos|>"]
    nomask = load_job(tiny_job(tmp_path, "c2", data={"paths": [str(path)], "format": "chat", "seq_len": 256, "mask_prompt": False}))
    full = D.tokenize_all(nomask, tok).train
    assert "Be terse." in _decoded_targets(tok, full)[0]


def test_batches_same_global_batch_for_any_world_size(tmp_path):
    job = load_job(tiny_job(tmp_path, "b"))
    tok = D.byte_tokenizer()
    rows = D.tokenize_all(job, tok).train
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
    first = D.prepare_data(job, tok, cache, True, lambda: None).train
    files = list(cache.glob("*.npz"))
    assert len(files) == 1
    again = D.prepare_data(job, tok, cache, True, lambda: None).train
    assert np.array_equal(first.input_ids, again.input_ids) and list(cache.glob("*.npz")) == files
    longer = load_job(tiny_job(tmp_path, "k2", data={"seq_len": 64}))
    D.prepare_data(longer, tok, cache, True, lambda: None)
    assert len(list(cache.glob("*.npz"))) == 2


def test_bad_row_is_a_one_line_error(tmp_path):
    # `orch validate` checks the first rows (orchestrator/datacheck.py); a bad row further down is
    # found by the trainer, with the same message (datacheck.row_problem).
    good = [json.dumps({"text": "fine"})] * datacheck.FIRST_ROWS
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(good + [json.dumps({"txt": "no text field"})]) + "\n")
    job = load_job(tiny_job(tmp_path, "bad", data={"paths": [str(path)]}))
    with pytest.raises(D.DataError, match=f"data.paths row {datacheck.FIRST_ROWS}: format 'text' needs a string field 'text'"):
        D.tokenize_all(job, D.byte_tokenizer())


# --- dataset mixing and the eval split ----------------------------------------------------------


def test_mixture_counts_share_an_epoch_by_weight():
    # N = 10 + 10 = 20 examples per epoch; shares 20 x 0.6 = 12 and 20 x 0.4 = 8
    assert D.mixture_counts([0.6, 0.4], [10, 10]) == [12, 8]
    # N = 10, shares 10/3 each: whole parts 3 + 3 + 3 = 9, the one left goes to the largest
    # remainder, all equal (1/3): the earliest source
    assert D.mixture_counts([1, 1, 1], [4, 3, 3]) == [4, 3, 3]
    # N = 102, shares 102 x 3/4 = 76.5 and 25.5: 76 + 25 = 101, the tie at .5 goes to the first
    assert D.mixture_counts([3, 1], [2, 100]) == [77, 25]
    # one source: every example once, whatever its weight
    assert D.mixture_counts([0.25], [7]) == [7]


def test_hold_out_uses_the_fraction_as_written():
    # 0.3 x 10 = 3 held out. The binary float 0.3 is 0.29999999999999998889...: its exact product
    # with 10 would floor to 2.
    train, held = D.hold_out(10, 0.3, seed=5, source=0)
    assert len(held) == 3 and len(train) == 7
    assert sorted(train.tolist() + held.tolist()) == list(range(10))
    assert train.tolist() == sorted(train.tolist()) and held.tolist() == sorted(held.tolist())
    again, _ = D.hold_out(10, 0.3, seed=5, source=0)
    assert again.tolist() == train.tolist()
    assert len({tuple(D.hold_out(10, 0.3, seed, 0)[1].tolist()) for seed in range(10)}) > 1  # the seed chooses


def test_draw_indices_whole_passes_then_a_seeded_draw():
    drawn = D.draw_indices(7, 3, seed=1, source=0)  # 7 = 2 whole passes over 3 + 1 drawn
    assert drawn[:6].tolist() == [0, 1, 2, 0, 1, 2] and len(drawn) == 7
    assert sorted(np.bincount(drawn, minlength=3).tolist()) == [2, 2, 3]
    few = D.draw_indices(4, 10, seed=1, source=0)  # fewer than the source has: no repeats, in file order
    assert len(set(few.tolist())) == 4 and few.tolist() == sorted(few.tolist())
    assert few.tolist() == D.draw_indices(4, 10, seed=1, source=0).tolist()
    assert few.tolist() != D.draw_indices(4, 10, seed=1, source=1).tolist()  # each source its own stream


def _lines(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def _row_texts(tok, rows) -> list[str]:
    return [tok.decode([t for t in rows.input_ids[r].tolist() if t < 256]) for r in range(rows.n)]


def test_two_sources_mixed_by_weight_with_per_source_counts(tmp_path):
    a = _lines(tmp_path / "a.jsonl", [f"a{i:02d}" for i in range(10)])
    b = _lines(tmp_path / "b.jsonl", [f"b{i:02d} longer" for i in range(30)])
    job = load_job(tiny_job(tmp_path, "mix", data={"paths": None, "sources": [{"path": a, "weight": 3}, {"path": b}],
                                                    "packing": False}))
    tok = D.byte_tokenizer()
    data = D.tokenize_all(job, tok)
    # N = 40 examples per epoch: a gets 40 x 3/4 = 30 (3 passes over its 10), b 10 of its 30
    assert [(d.available, d.per_epoch, d.held_out) for d in data.draws] == [(10, 30, 0), (30, 10, 0)]
    texts = _row_texts(tok, data.train)
    assert data.train.n == 40  # one example per row (packing off)
    assert all(texts.count(f"a{i:02d}") == 3 for i in range(10))
    b_rows = [t for t in texts if t.startswith("b")]
    assert len(b_rows) == len(set(b_rows)) == 10
    # per-source counts: a row of "aNN" holds bos + 3 bytes + eos = 5 tokens, 4 of them targets;
    # "bNN longer" 12 tokens, 11 targets
    uses = np.ones(data.train.n, dtype=np.int64)
    counts = data.train.source_counts(uses)
    assert counts.examples.tolist() == [30, 10]
    assert counts.tokens.tolist() == [30 * 5, 10 * 12]
    assert counts.loss_tokens.tolist() == [30 * 4, 10 * 11]


def test_long_example_counts_once_over_its_windows(tmp_path):
    path = _lines(tmp_path / "long.jsonl", ["x" * 40])
    job = load_job(tiny_job(tmp_path, "lw", data={"paths": [path], "seq_len": 32, "packing": False}))
    rows = D.tokenize_all(job, D.byte_tokenizer()).train
    # bos + 40 bytes + eos = 42 tokens: windows of 32 and 10, one example
    assert rows.n == 2
    counts = rows.source_counts(np.ones(2, dtype=np.int64))
    assert counts.examples.tolist() == [1] and counts.tokens.tolist() == [42]
    assert counts.loss_tokens.tolist() == [31 + 9]  # each window's last token has no target in the window


def test_eval_fraction_holds_out_examples_before_packing(tmp_path):
    a = _lines(tmp_path / "a.jsonl", [f"a{i:02d}" for i in range(10)])
    b = _lines(tmp_path / "b.jsonl", [f"b{i:02d}" for i in range(30)])
    job = load_job(tiny_job(tmp_path, "ev", data={"paths": None, "sources": [{"path": a}, {"path": b}],
                                                   "eval_fraction": 0.2, "packing": True, "seq_len": 32}))
    tok = D.byte_tokenizer()
    data = D.tokenize_all(job, tok)
    # floor(0.2 x 10) = 2 and floor(0.2 x 30) = 6 held out; 8 + 24 = 32 for training, equal weights: 16 each
    assert [(d.available, d.per_epoch, d.held_out) for d in data.draws] == [(8, 16, 2), (24, 16, 6)]

    def examples(rows):  # packed rows: split each row's text at the example borders (bos/eos)
        return {t for r in range(rows.n) for t in tok.decode(rows.input_ids[r].tolist()).replace("<|bos|>", " ")
                .replace("<|eos|>", " ").replace("<|pad|>", " ").split()}
    train, held = examples(data.train), examples(data.eval)
    assert len(held) == 8 and not train & held  # never the same example in both
    assert len(train) == 8 + 16  # a's 8 (each twice), 16 drawn of b's 24
    assert data.eval.source_examples.sum(axis=0).tolist() == [2, 6]
    assert D.tokenize_all(job, tok).eval.input_ids.tolist() == data.eval.input_ids.tolist()  # deterministic


def test_eval_paths_are_read_whole_in_their_own_format(tmp_path):
    chat = tmp_path / "eval.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}) + "\n")
    job = load_job(tiny_job(tmp_path, "ep", data={"eval_sources": [{"path": str(chat), "format": "chat"}], "seq_len": 64}))
    tok = D.byte_tokenizer()
    data = D.tokenize_all(job, tok)
    assert data.eval.n == 1 and _decoded_targets(tok, data.eval) == ["yo\n<|eos|>"]
    assert data.draws[0].held_out == 0


def test_source_counts_are_the_rows_of_the_steps(tmp_path):
    a = _lines(tmp_path / "a.jsonl", [f"a{i:02d}" for i in range(10)])
    b = _lines(tmp_path / "b.jsonl", [f"b{i:02d} longer" for i in range(7)])
    job = load_job(tiny_job(tmp_path, "sc", data={"paths": None, "sources": [{"path": a, "weight": 2}, {"path": b}],
                                                   "packing": False}))
    rows = D.tokenize_all(job, D.byte_tokenizer()).train
    batcher = D.Batcher(rows, seed=3, micro_batch=2, grad_accum=2, world=1)  # 4 rows per step, 17 rows: epochs wrap
    for steps in (0, 1, 4, 5, 13):
        taken = np.concatenate([batcher.step_rows(s) for s in range(steps)]) if steps else np.zeros(0, dtype=np.int64)
        counts = batcher.source_counts(steps)
        assert counts.tokens.tolist() == rows.source_tokens[taken].sum(axis=0).tolist()
        assert counts.examples.tolist() == rows.source_examples[taken].sum(axis=0).tolist()


def test_render_mixture_hand_computed():
    counts = D.SourceCounts(tokens=np.array([621, 379]), loss_tokens=np.array([600, 300]), examples=np.array([3, 2]))
    job_sources = [DataSource((DataFile("x/a.jsonl", ("data", "sources", 0, "path")),), "text", ("data", "format"), 0.6),
                   DataSource((DataFile("b.parquet", ("data", "sources", 1, "path")),), "chat", ("data", "format"), 0.4)]
    shares = D.mixture(job_sources, counts)
    # 621 / (621 + 379) = 62.1 %
    assert D.render_mixture(shares) == "mixture: a.jsonl 62.1 % of tokens (weight 0.6), b.parquet 37.9 % of tokens (weight 0.4)"
    assert [s.loss_tokens for s in shares] == [600, 300]
    # two sources with the same file name are told apart by their paths
    same = [job_sources[0], DataSource((DataFile("y/a.jsonl", ("data", "sources", 1, "path")),), "text", ("data", "format"), 1)]
    assert [s.name for s in D.mixture(same, counts)] == ["x/a.jsonl", "y/a.jsonl"]


def test_cache_key_covers_sources_weights_and_the_seed_that_draws(tmp_path):
    a = _lines(tmp_path / "a.jsonl", ["one", "two"])
    b = _lines(tmp_path / "b.jsonl", ["three"])
    tok = D.byte_tokenizer()

    def key(**data):
        return D.cache_key(load_job(tiny_job(tmp_path, "ck", data=data)), tok)

    mixed = {"paths": None, "sources": [{"path": a}, {"path": b}]}
    assert key(**mixed) != key(paths=None, sources=[{"path": a}, {"path": b, "weight": 2}])
    assert key(**mixed) != key(paths=None, sources=[{"path": a}])
    assert key(**mixed) != key(paths=None, sources=[{"path": a}, {"path": b, "format": "text"}, {"path": b}])
    assert key(**mixed) != key(**mixed, eval_fraction=0.3)
    seeded = lambda seed, data: D.cache_key(load_job(tiny_job(tmp_path, "ck", data=data, training={"seed": seed})), tok)  # noqa: E731
    assert seeded(1, mixed) != seeded(2, mixed)  # the draw depends on the seed
    one = {"paths": [a]}
    assert seeded(1, one) == seeded(2, one)  # one source, no hold-out: nothing drawn, the cache stays


def _fake_token_loss(arrays: dict) -> float:
    """A stand-in for a model's summed token losses of a micro batch: a fixed function of each loss
    token (its input id, target and position), 0 where the target is IGNORE."""
    keep = arrays["targets"] != D.IGNORE
    per_token = 0.01 * (arrays["input_ids"] % 7 + 1) + 0.001 * arrays["position_ids"] + 0.0001 * (arrays["targets"] % 5)
    return float((per_token * keep).sum())


@pytest.mark.parametrize("micro_batch", [1, 2, 4])
def test_eval_loss_is_the_same_for_1_2_and_3_ranks(tmp_path, micro_batch):
    job = load_job(tiny_job(tmp_path, "el", data={"seq_len": 16}))
    rows = D.tokenize_all(job, D.byte_tokenizer()).train  # 48 lines of 17-57 bytes in rows of 16 tokens
    rows = D.Rows(*(getattr(rows, f)[:23] for f in D.Rows.__dataclass_fields__))  # 23 rows: no world size divides it
    whole = _fake_token_loss({"input_ids": rows.input_ids, "position_ids": rows.position_ids, "targets": rows.targets})
    expected = whole / int(rows.loss_tokens().sum())
    for world in (1, 2, 3):
        split = [D.EvalBatches(rows, micro_batch, world, pad_id=258) for _ in range(world)]
        counts = {b.micro_batches for b in split}
        assert counts == {-(-23 // (micro_batch * world))}  # every rank the same number of micro batches
        seen = [int(i) for r in range(world) for m in range(split[r].micro_batches)
                for i in split[r].micro_rows(m, r) if i >= 0]
        assert sorted(seen) == list(range(23))  # every row once over all ranks
        rank_sums = [sum(_fake_token_loss(split[r].micro_batch_arrays(m, r)) for m in range(split[r].micro_batches))
                     for r in range(world)]
        assert all(b.loss_tokens == int(rows.loss_tokens().sum()) for b in split)
        assert sum(rank_sums) / split[0].loss_tokens == pytest.approx(expected, rel=1e-12)
