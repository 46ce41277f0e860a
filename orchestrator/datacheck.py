"""Validate-time checks of the training data: the first rows of every data file.

`orch validate` (and plan, compile, submit: all of them load the spec through
`spec.check_files`) reads the first FIRST_ROWS rows of each file of every source
(data.paths / data.sources, and the eval files) and checks them against that
source's format with :func:`row_problem`, the same function the trainer
(orchestrator/data.py) applies to every row, so the two cannot disagree about what a
format needs. An empty file, rows of another format and a folder that is not a
``save_to_disk`` dataset are then one-line spec errors before anything is queued,
not a trainer failure after the queue wait.

Torch-free and cheap: JSON lines through ``json``, Parquet and ``save_to_disk``
Arrow files through ``pyarrow`` (imported only when such a file is named), and only
the first rows. A bad row further down is still the trainer's to find.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

FIRST_ROWS = 16
"""Rows read from the start of each data file."""
MAX_ROW_BYTES = 16 * 1024 * 1024
"""A JSON line longer than this ends the check of that file (the trainer reads it; validate stays fast)."""


class DataFileError(Exception):
    """A data file that cannot be a data set (one line, without the file's name)."""


def row_problem(fmt: str, row: Any) -> Optional[str]:
    """What a row lacks for ``fmt`` ('text', 'alpaca' or 'chat'), or None when it has it."""
    if not isinstance(row, dict):
        return f"format {fmt!r} needs each row to be an object, got {type(row).__name__}"
    if fmt == "text":
        if not isinstance(row.get("text"), str):
            return "format 'text' needs a string field 'text'"
        return None
    if fmt == "alpaca":
        for key in ("instruction", "output"):
            if not isinstance(row.get(key), str):
                return f"format 'alpaca' needs a string field {key!r}"
        return None
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
        return "format 'chat' needs 'messages': a list of {role, content}"
    return None


@dataclass(frozen=True)
class FirstRows:
    """The first rows of one data file, and where the first one that is not a mapping came from."""

    rows: list[Any]
    """Up to FIRST_ROWS rows, as read (dicts for well-formed data)."""
    where: list[str]
    """For each row, how to find it: 'line 3' (JSON lines), 'item 3' (a JSON list), 'row 3' (tables)."""
    cut_short: bool = False
    """Reading stopped at a byte limit (a huge first row): fewer rows, even none, say nothing about the file."""


def first_rows(path: Path, n: int = FIRST_ROWS) -> FirstRows:
    """The first ``n`` rows of a JSON lines / JSON list / Parquet file or a save_to_disk folder.

    Raises DataFileError when the file cannot be read as data at all.
    """
    if path.is_dir():
        return _saved_dataset_rows(path, n)
    if path.suffix == ".parquet":
        return _parquet_rows(path, n)
    return _json_rows(path, n)


def _json_rows(path: Path, n: int) -> FirstRows:
    rows: list[Any] = []
    where: list[str] = []
    with path.open("rb") as f:
        head = f.read(1024).lstrip()
        f.seek(0)
        if head.startswith(b"["):
            text = f.read(MAX_ROW_BYTES)
            return _json_list_rows(text, n, complete=not f.read(1))
        for number, raw in enumerate(iter(lambda: f.readline(MAX_ROW_BYTES), b""), 1):
            if len(rows) >= n:
                break
            if len(raw) >= MAX_ROW_BYTES and not raw.endswith(b"\n"):
                return FirstRows(rows, where, cut_short=True)
            if not raw.strip():
                continue
            try:
                rows.append(json.loads(raw))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise DataFileError(f"line {number} is not JSON ({_reason(exc)})") from None
            where.append(f"line {number}")
    return FirstRows(rows, where)


def _json_list_rows(text_bytes: bytes, n: int, complete: bool) -> FirstRows:
    """Items of a JSON list (a .json file holding ``[{...}, ...]``), read from its start."""
    try:
        text = text_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        if complete or exc.start < len(text_bytes) - 4:
            raise DataFileError(f"not UTF-8 text (bad byte at offset {exc.start})") from None
        text = text_bytes[: exc.start].decode("utf-8")  # a character cut at the end of the buffer
    decoder = json.JSONDecoder()
    rows: list[Any] = []
    at = text.index("[") + 1
    cut_short = False
    while len(rows) < n:
        while at < len(text) and text[at] in " \t\r\n,":
            at += 1
        if at < len(text) and text[at] == "]":
            break
        if at >= len(text):
            cut_short = not complete
            break
        try:
            item, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError as exc:
            if not complete:
                cut_short = True  # the buffer ends inside an item: the rows so far are the check
                break
            raise DataFileError(f"item {len(rows) + 1} of the JSON list is not JSON ({_reason(exc)})") from None
        rows.append(item)
    return FirstRows(rows, [f"item {i}" for i in range(1, len(rows) + 1)], cut_short)


def _reason(exc: Exception) -> str:
    return str(exc).split(":")[0] if isinstance(exc, json.JSONDecodeError) else type(exc).__name__


def _parquet_rows(path: Path, n: int) -> FirstRows:
    import pyarrow.parquet as pq

    try:
        batch = next(pq.ParquetFile(path).iter_batches(batch_size=n), None)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for "not Parquet"
        raise DataFileError(f"not a Parquet file ({type(exc).__name__}: {_first_line(exc)})") from None
    rows = batch.to_pylist()[:n] if batch is not None else []
    return FirstRows(rows, [f"row {i}" for i in range(1, len(rows) + 1)])


def _saved_dataset_rows(folder: Path, n: int) -> FirstRows:
    """Rows of a ``datasets`` save_to_disk folder: a Dataset (state.json + Arrow stream files) or a
    DatasetDict (dataset_dict.json + one such folder per split; the trainer uses 'train', else the first)."""
    dict_file = folder / "dataset_dict.json"
    if dict_file.is_file():
        splits = _json_file(dict_file).get("splits")
        if not isinstance(splits, list) or not splits or not all(isinstance(s, str) for s in splits):
            raise DataFileError("dataset_dict.json lists no splits")
        split = "train" if "train" in splits else splits[0]
        return _saved_dataset_rows(folder / split, n)
    state_file = folder / "state.json"
    if not state_file.is_file():
        raise DataFileError("is a folder but not a data set saved with save_to_disk (no state.json or dataset_dict.json); "
                            "name the data files themselves")
    files = _json_file(state_file).get("_data_files")
    if not isinstance(files, list) or not all(isinstance(f, dict) and isinstance(f.get("filename"), str) for f in files):
        raise DataFileError("state.json lists no _data_files")
    import pyarrow as pa

    rows: list[Any] = []
    for entry in files:
        arrow = folder / entry["filename"]
        try:
            with pa.memory_map(str(arrow)) as source:
                reader = pa.ipc.open_stream(source)
                for batch in reader:
                    rows += batch.slice(0, n - len(rows)).to_pylist()
                    if len(rows) >= n:
                        break
        except Exception as exc:  # noqa: BLE001 - missing file, not Arrow: pyarrow raises several types
            raise DataFileError(f"cannot read {entry['filename']} ({type(exc).__name__}: {_first_line(exc)})") from None
        if len(rows) >= n:
            break
    return FirstRows(rows, [f"row {i}" for i in range(1, len(rows) + 1)])


def _json_file(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataFileError(f"cannot read {path.name} ({type(exc).__name__})") from None
    if not isinstance(value, dict):
        raise DataFileError(f"{path.name} is not a JSON object")
    return value


def _first_line(exc: Exception) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else ""


def _keys(row: Any) -> str:
    if not isinstance(row, dict):
        return type(row).__name__
    keys = [str(k) for k in row][:8]
    return "keys " + ", ".join(keys) if keys else "no keys"


@dataclass(frozen=True)
class DataProblem:
    """One problem with a data file, for a one-line spec error."""

    key: tuple
    """The spec key path to name (and find the YAML line of): the file's own key (('data', 'paths', i),
    ('data', 'sources', i, 'path'), ...) for the file itself, the format's key (('data', 'format') or
    ('data', 'sources', i, 'format')) for rows that do not fit the format."""
    message: str
    """The rest of the line."""

    @property
    def field(self) -> str:
        return ".".join(map(str, self.key))


def check_data_path(path: str, fmt: str, path_key: tuple, format_key: tuple) -> Optional[DataProblem]:
    """The first problem of one data file's first rows, or None. ``path_key`` and ``format_key`` are the
    spec keys of the file and of the format it is read in. The caller has checked that the path exists
    and (for a file) can be opened."""
    try:
        first = first_rows(Path(path))
    except DataFileError as exc:
        return DataProblem(path_key, f"{path!r}: {exc}")
    if not first.rows and not first.cut_short:
        return DataProblem(path_key, f"{path!r} has no rows")
    for row, where in zip(first.rows, first.where):
        problem = row_problem(fmt, row)
        if problem is not None:
            named = ".".join(map(str, path_key))
            return DataProblem(format_key, f"{problem}, but {where} of {path!r} ({named}) has {_keys(row)}")
    return None
