"""Validate-time data checks (orchestrator/datacheck.py): the torch-free reader sees the rows the
trainer's reader (orchestrator/data.py, through `datasets`) sees, and the row check is the one the
trainer applies, so `orch validate` and the trainer cannot disagree about a row.

Rejections through the CLI are in tests/test_spec.py (CASES: empty_data_file, chat_format_on_text_rows,
...) and, as real `orch submit` processes, in tests/reliability/test_bad_environment.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator import data as D
from orchestrator import datacheck
from orchestrator.spec import DataFile

ROWS = [{"text": f"row {i}", "n": i} for i in range(40)]
FORMAT_KEY = ("data", "format")


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _saved(folder: Path, rows: list, splits: tuple[str, ...] = ()) -> Path:
    import datasets

    ds = datasets.Dataset.from_list(rows)
    if splits:
        datasets.DatasetDict({s: ds.select(range(i, len(rows))) for i, s in enumerate(splits)}).save_to_disk(str(folder))
    else:
        ds.save_to_disk(str(folder))
    return folder


def _parquet(path: Path, rows: list) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=7)  # several row groups
    return path


FILE_KINDS = {
    "jsonl": lambda d: _jsonl(d / "x.jsonl", ROWS),
    "jsonl_blank_lines": lambda d: _text(d / "x.jsonl", "\n" + "\n\n".join(json.dumps(r) for r in ROWS)),
    "json_list": lambda d: _text(d / "x.json", json.dumps(ROWS, indent=1)),
    "parquet": lambda d: _parquet(d / "x.parquet", ROWS),
    "save_to_disk": lambda d: _saved(d / "saved", ROWS),
    "save_to_disk_dict_train": lambda d: _saved(d / "saved", ROWS, ("test", "train")),
    "save_to_disk_dict_no_train": lambda d: _saved(d / "saved", ROWS, ("validation", "test")),
}


@pytest.mark.parametrize("kind", FILE_KINDS)
def test_first_rows_are_the_rows_the_trainer_reads(tmp_path: Path, kind: str) -> None:
    path = FILE_KINDS[kind](tmp_path)
    first = datacheck.first_rows(path)
    trainer_rows = D.read_rows([DataFile(str(path), ("data", "paths", 0))])  # the trainer's reader: datasets
    assert len(first.rows) == datacheck.FIRST_ROWS
    assert first.rows == [trainer_rows[i] for i in range(datacheck.FIRST_ROWS)]
    assert not first.cut_short


# Rows and what each format says of them. The trainer raises for exactly the rows validate rejects
# (checked below through data.example_tokens with the byte tokenizer).
ROW_CASES = [
    ("text", {"text": "hi"}, None),
    ("text", {"txt": "hi"}, "format 'text' needs a string field 'text'"),
    ("text", {"text": 5}, "format 'text' needs a string field 'text'"),
    ("alpaca", {"instruction": "a", "output": "b"}, None),
    ("alpaca", {"instruction": "a", "input": None, "output": "b"}, None),
    ("alpaca", {"instruction": "a", "input": "x"}, "format 'alpaca' needs a string field 'output'"),
    ("alpaca", {"text": "hi"}, "format 'alpaca' needs a string field 'instruction'"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, None),
    ("chat", {"text": "hi"}, "format 'chat' needs 'messages': a list of {role, content}"),
    ("chat", {"messages": [{"role": "user"}]}, "format 'chat' needs 'messages': a list of {role, content}"),
    ("chat", {"messages": "hi"}, "format 'chat' needs 'messages': a list of {role, content}"),
]


@pytest.mark.parametrize("fmt, row, problem", ROW_CASES)
def test_row_problem_is_what_the_trainer_raises(fmt: str, row: dict, problem: str | None) -> None:
    assert datacheck.row_problem(fmt, row) == problem
    tok = D.byte_tokenizer()
    if problem is None:
        ids, mask = D.example_tokens(fmt, True, tok, row, "data row 0")
        assert len(ids) == len(mask) >= 2
    else:
        with pytest.raises(D.DataError) as exc:
            D.example_tokens(fmt, True, tok, row, "data row 0")
        assert str(exc.value) == f"data row 0: {problem}"


def test_check_names_the_first_bad_row_and_its_keys(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, {"text": "ok"}, {"prompt": "p", "completion": "c"}])
    found = datacheck.check_data_path(str(path), "text", ("data", "paths", 0), FORMAT_KEY)
    assert found is not None and found.field == "data.format"
    assert found.message == (f"format 'text' needs a string field 'text', but line 3 of {str(path)!r} (data.paths.0) "
                             "has keys prompt, completion")


def test_only_the_first_rows_are_read(tmp_path: Path) -> None:
    """A bad row after the first FIRST_ROWS is the trainer's to find: validate stays cheap on big files."""
    rows = [{"text": "ok"}] * datacheck.FIRST_ROWS + [{"nope": 1}]
    assert datacheck.check_data_path(str(_jsonl(tmp_path / "d.jsonl", rows)), "text", ("data", "paths", 0), FORMAT_KEY) is None


@pytest.mark.parametrize("content, message", [
    ("", "has no rows"),
    ("\n\n  \n", "has no rows"),
    ("[]", "has no rows"),
    ('{"text": "a"}\n{"text": \n', "line 2 is not JSON (Expecting value)"),
    ('[{"text": "a"}, {"text": ]', "item 2 of the JSON list is not JSON (Expecting value)"),
])
def test_file_problems(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "d.json"
    path.write_text(content)
    found = datacheck.check_data_path(str(path), "text", ("data", "paths", 3), FORMAT_KEY)
    assert found is not None and found.field == "data.paths.3"
    assert found.message.endswith(message), found.message


def test_empty_parquet_and_empty_saved_dataset(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "e.parquet")
    assert datacheck.check_data_path(str(tmp_path / "e.parquet"), "text", ("data", "paths", 0), FORMAT_KEY).message.endswith("has no rows")
    import datasets

    datasets.Dataset.from_dict({"text": []}).save_to_disk(str(tmp_path / "e_saved"))
    assert datacheck.check_data_path(str(tmp_path / "e_saved"), "text", ("data", "paths", 0), FORMAT_KEY).message.endswith("has no rows")


def test_folder_that_is_not_a_saved_dataset(tmp_path: Path) -> None:
    folder = tmp_path / "shards"
    folder.mkdir()
    _jsonl(folder / "a.jsonl", ROWS)
    found = datacheck.check_data_path(str(folder), "text", ("data", "paths", 0), FORMAT_KEY)
    assert found is not None and found.field == "data.paths.0"
    assert "not a data set saved with save_to_disk" in found.message
    with pytest.raises(D.DataError):  # the trainer's reader refuses it too
        D.read_rows([DataFile(str(folder), ("data", "paths", 0))])


def test_not_parquet(tmp_path: Path) -> None:
    path = tmp_path / "x.parquet"
    path.write_text('{"text": "a"}\n')
    found = datacheck.check_data_path(str(path), "text", ("data", "paths", 0), FORMAT_KEY)
    assert found is not None and "not a Parquet file" in found.message


def test_huge_first_line_is_not_called_empty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A row longer than the read limit ends the check without a verdict (the limit is lowered here
    # instead of writing 16 MiB).
    monkeypatch.setattr(datacheck, "MAX_ROW_BYTES", 64)
    path = _jsonl(tmp_path / "big.jsonl", [{"text": "x" * 200}])
    first = datacheck.first_rows(path)
    assert first.rows == [] and first.cut_short
    assert datacheck.check_data_path(str(path), "text", ("data", "paths", 0), FORMAT_KEY) is None
