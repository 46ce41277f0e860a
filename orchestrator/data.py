"""Training data: tokenizer, sources -> examples -> token rows (packed), deterministic batches.

Imported only by the trainer. Steps:

1. Read each source's local JSONL / Parquet / ``save_to_disk`` folders with
   ``datasets`` (``data.paths`` is one source; ``data.sources`` several, each with
   its own format and weight; the eval split's files likewise).
2. Choose the examples, a pure function of (seed, weights, source sizes):
   ``data.eval_fraction`` first holds out floor(fraction x size) examples of each
   training source (:func:`hold_out`), so train and eval never share an example;
   then an epoch of N = all remaining training examples is shared out by weight
   (:func:`mixture_counts`: largest remainders, so the shares add up to N exactly)
   and each source gives its share as whole passes over its examples plus a
   seeded draw without replacement (:func:`draw_indices`). One source with any
   weight is each example once, in file order.
3. Turn each example into token ids plus a loss mask (format text, alpaca or
   chat; prompt tokens masked when ``data.mask_prompt``).
4. Pack examples into rows of ``seq_len`` tokens (or one example per row). In a
   packed row ``position_ids`` restart at 0 for every example and targets never
   point across an example border, so no example learns from its neighbour.
   Attention: with no attention mask and restarting position_ids, transformers
   builds per-example attention itself -- varlen kernels for flash_attention_2
   (no extra memory), a block-diagonal causal 4D mask for sdpa/eager. The sdpa
   mask costs micro_batch x seq_len^2 bytes (4 MiB per row at 2048) and moves
   sdpa from the flash kernel to the memory-efficient one; we accept that for
   correctness, and flash_attention_2 is the fast choice for long packed rows.
   Each row records the tokens, loss tokens and examples it holds per source, so
   the mixture actually trained on is known for any number of steps.
5. Cache the rows in ``<output_dir>/data_cache/<hash>.npz`` (hash of the sources'
   files, sizes, mtimes, formats and weights, the eval split, the seed where the
   choice depends on it, seq_len, packing, masking and tokenizer), built by rank
   0, read by all.
6. Batches: optimizer step s uses rows ``[s*G, (s+1)*G)`` of an endless stream
   that is a fresh seeded permutation of all rows per epoch; micro batch m of
   rank r takes rows ``(m*world + r)*mb ...``. The batch is a pure function of
   (seed, step), so a resumed run needs only the step number, and every rank
   knows the loss-token count of the whole optimizer step without talking to
   the others. Eval batches (:class:`EvalBatches`) cover the eval rows exactly
   once over all ranks, padded so every rank runs the same number.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from fractions import Fraction
from typing import Callable, Optional, Sequence

import numpy as np

from orchestrator.datacheck import row_problem
from orchestrator.errors import Exit, OrchError
from orchestrator.spec import DataFile, DataSource, JobSpec

CACHE_VERSION = 2
IGNORE = -100
# Independent random streams of one seed (numpy SeedSequence entropy [seed, stream, source]);
# the Batcher's epoch permutations use [seed, epoch].
HOLDOUT_STREAM = 1
MIX_STREAM = 2

# A minimal chat template for the built-in byte tokenizer (tokenizers with
# their own template use theirs).
BYTE_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"


class DataError(OrchError):
    """A user-facing data problem (one line, names the file or field)."""

    code = Exit.BAD_SPEC


# ---------------------------------------------------------------------------
# tokenizer


def byte_tokenizer():
    """A byte-level tokenizer built here (no download): 256 byte tokens + bos/eos/pad = 259 ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>")
    fast.chat_template = BYTE_CHAT_TEMPLATE
    return fast


def load_tokenizer(job: JobSpec, vocab_size: int):
    """The spec's tokenizer folder, else the model folder's, else the byte tokenizer (presets)."""
    model_folder = job.model.folder()
    folder = job.model.tokenizer or (None if model_folder is None else str(model_folder))
    if folder is not None:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - transformers raises several types for "no tokenizer here"
            if job.model.tokenizer is not None:
                raise DataError(f"model.tokenizer: cannot load a tokenizer from {folder!r} ({exc})") from None
            tok = byte_tokenizer()  # a config-only folder (random weights): no tokenizer files
    else:
        tok = byte_tokenizer()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if len(tok) > vocab_size:
        raise DataError(f"model.tokenizer: {len(tok)} tokens do not fit the model's vocab_size {vocab_size}")
    return tok


def tokenizer_fingerprint(tok) -> str:
    try:
        text = tok.backend_tokenizer.to_str()
    except AttributeError:
        text = json.dumps(sorted(tok.get_vocab().items()))
    text += str(tok.chat_template) + str(tok.bos_token_id) + str(tok.eos_token_id)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------
# reading and tokenizing


def read_rows(files: Sequence[DataFile]):
    """All rows of one source's files as one ``datasets.Dataset``."""
    import datasets

    parts = []
    for file in files:
        path = Path(file.path)
        try:
            if path.is_dir():
                ds = datasets.load_from_disk(str(path))
                if isinstance(ds, datasets.DatasetDict):
                    ds = ds["train"] if "train" in ds else next(iter(ds.values()))
            elif path.suffix == ".parquet":
                ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
            else:
                ds = datasets.load_dataset("json", data_files=str(path), split="train")
        except Exception as exc:  # noqa: BLE001 - any reader failure is a data problem to name
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise DataError(f"{file.field}: cannot read {file.path!r}: {type(exc).__name__}: {first}") from None
        parts.append(ds)
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _bos(tok) -> list[int]:
    return [tok.bos_token_id] if tok.bos_token_id is not None else []


def example_tokens(fmt: str, mask_prompt: bool, tok, row: dict, where: str) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of one example in format ``fmt``; mask 1 = the model learns to predict this token."""
    problem = row_problem(fmt, row)  # the check `orch validate` runs on the first rows
    if problem is not None:
        raise DataError(f"{where}: {problem}")
    eos = [tok.eos_token_id]
    if fmt == "text":
        ids = _bos(tok) + _enc(tok, row["text"]) + eos
        return ids, [1] * len(ids)
    if fmt == "alpaca":
        extra = row.get("input") or ""
        prompt = ALPACA_PROMPT.format(instruction=row["instruction"], input_block=f"### Input:\n{extra}\n\n" if extra else "")
        p = _bos(tok) + _enc(tok, prompt)
        r = _enc(tok, row["output"]) + eos
        return p + r, [0 if mask_prompt else 1] * len(p) + [1] * len(r)
    # chat: render the conversation with the tokenizer's template; the text each
    # assistant turn adds is a loss segment, everything else is prompt.
    msgs = row["messages"]
    template = tok.chat_template or BYTE_CHAT_TEMPLATE
    ids: list[int] = []
    mask: list[int] = []
    done = ""
    for i, m in enumerate(msgs):
        if m["role"] == "assistant":
            before = tok.apply_chat_template(msgs[:i], chat_template=template, tokenize=False, add_generation_prompt=True)
        else:
            before = None
        after = tok.apply_chat_template(msgs[: i + 1], chat_template=template, tokenize=False)
        if before is not None:
            if before.startswith(done) and len(before) > len(done):
                seg = _enc(tok, before[len(done):])
                ids += seg
                mask += [0 if mask_prompt else 1] * len(seg)
                done = before
            seg = _enc(tok, after[len(done):])
            ids += seg
            mask += [1] * len(seg)
        else:
            seg = _enc(tok, after[len(done):])
            ids += seg
            mask += [0 if mask_prompt else 1] * len(seg)
        done = after
    ids = _bos(tok) + ids + eos
    mask = [0] * len(_bos(tok)) + mask + [1]
    return ids, mask


# ---------------------------------------------------------------------------
# rows


@dataclass(frozen=True)
class SourceCounts:
    """Tokens, loss tokens and examples per source (one entry per source, in spec order)."""

    tokens: np.ndarray
    """Tokens that are not padding."""
    loss_tokens: np.ndarray
    """Tokens the loss is computed on (not padding, not a masked prompt)."""
    examples: np.ndarray
    """Examples (an example split into several windows counts once, in the row of its first window)."""


@dataclass
class Rows:
    """Token rows ready for training (token arrays [N, seq_len]; per-source counts [N, sources])."""

    input_ids: np.ndarray
    position_ids: np.ndarray
    targets: np.ndarray
    """Next-token target at each position, IGNORE where masked, padded, or across an example border."""
    source_tokens: np.ndarray
    """Tokens (not padding) of each source in each row."""
    source_loss_tokens: np.ndarray
    """Loss tokens of each source in each row."""
    source_examples: np.ndarray
    """Examples of each source that start in each row."""

    @property
    def n(self) -> int:
        return int(self.input_ids.shape[0])

    def loss_tokens(self) -> np.ndarray:
        """Loss tokens per row."""
        return (self.targets != IGNORE).sum(axis=1)

    def source_counts(self, uses: np.ndarray) -> SourceCounts:
        """Per-source totals of rows used ``uses[r]`` times each."""
        return SourceCounts(uses @ self.source_tokens, uses @ self.source_loss_tokens, uses @ self.source_examples)

    def arrays(self) -> dict[str, np.ndarray]:
        """Every array by field name (what the cache stores)."""
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


@dataclass(frozen=True)
class Piece:
    """A run of tokens that goes into one row: a whole example, or one window of a long one."""

    ids: list[int]
    """Token ids."""
    mask: list[int]
    """1 where the model learns to predict this token."""
    source: int = 0
    """Index of the source the example came from."""
    first: bool = True
    """The example's first window (examples are counted there)."""


def _windows(ids: list[int], mask: list[int], seq_len: int, split: bool) -> list[tuple[list[int], list[int]]]:
    """An example longer than seq_len: split into windows (text) or truncated (prompt/response formats)."""
    if len(ids) <= seq_len:
        return [(ids, mask)]
    if not split:
        return [(ids[:seq_len], mask[:seq_len])]
    return [(ids[i:i + seq_len], mask[i:i + seq_len]) for i in range(0, len(ids), seq_len) if len(ids) - i >= 2]


def build_rows(pieces: Sequence[Piece], seq_len: int, packing: bool, pad_id: int, n_sources: int = 1) -> Rows:
    """Greedy in-order packing (or one piece per row); pads fill the rest of a row."""
    rows: list[list[Piece]] = []
    cur: list[Piece] = []
    used = 0
    for piece in pieces:
        n = len(piece.ids)
        if cur and (not packing or used + n > seq_len):
            rows.append(cur)
            cur, used = [], 0
        cur.append(piece)
        used += n
    if cur:
        rows.append(cur)
    N = len(rows)
    inp = np.full((N, seq_len), pad_id, dtype=np.int64)
    pos = np.zeros((N, seq_len), dtype=np.int64)
    tgt = np.full((N, seq_len), IGNORE, dtype=np.int64)
    counts = {name: np.zeros((N, n_sources), dtype=np.int64) for name in ("tokens", "loss", "examples")}
    for r, parts in enumerate(rows):
        at = 0
        for piece in parts:
            ids, n = piece.ids, len(piece.ids)
            inp[r, at:at + n] = ids
            pos[r, at:at + n] = np.arange(n)
            # target at t is token t+1 of the same example, if that token is in the loss
            nxt = np.array(ids[1:], dtype=np.int64)
            keep = np.array(piece.mask[1:], dtype=bool)
            tgt[r, at:at + n - 1] = np.where(keep, nxt, IGNORE)
            counts["tokens"][r, piece.source] += n
            counts["loss"][r, piece.source] += int(keep.sum())
            counts["examples"][r, piece.source] += int(piece.first)
            at += n
        # padding: positions keep counting (one more "example" nobody attends to
        # from a real token, causal), targets ignored
        if at < seq_len:
            pos[r, at:] = np.arange(seq_len - at)
    return Rows(inp, pos, tgt, counts["tokens"], counts["loss"], counts["examples"])


# ---------------------------------------------------------------------------
# choosing examples: eval hold-out and mixing (pure functions of seed, weights and sizes)


def _exact(x: float) -> Fraction:
    """The decimal a float was written as (0.3 is 3/10, not the binary float just below it)."""
    return Fraction(repr(x))


def hold_out(size: int, fraction: float, seed: int, source: int) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, eval indices) of a source of ``size`` examples, both in file order:
    floor(fraction x size) examples drawn by ``seed`` for the eval split, the rest for training."""
    k = int(_exact(fraction) * size)
    chosen = np.zeros(size, dtype=bool)
    chosen[np.random.default_rng([seed, HOLDOUT_STREAM, source]).permutation(size)[:k]] = True
    return np.flatnonzero(~chosen), np.flatnonzero(chosen)


def mixture_counts(weights: Sequence[float], sizes: Sequence[int]) -> list[int]:
    """Examples of each source in one epoch: N = sum(sizes) shared out by weight.

    Source i's exact share is N x w_i / sum(w); each gets the whole part, and the examples left
    over go one each to the largest fractional parts (ties to the earlier source), so the counts
    add up to N exactly. Exact rational arithmetic on the weights as written: the same counts on
    every machine.
    """
    total = sum(sizes)
    w = [_exact(x) for x in weights]
    exact = [total * x / sum(w) for x in w]
    counts = [int(e) for e in exact]
    by_remainder = sorted(range(len(w)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[:total - sum(counts)]:
        counts[i] += 1
    return counts


def draw_indices(count: int, size: int, seed: int, source: int) -> np.ndarray:
    """``count`` example indices of a source of ``size``: count // size whole passes in file order,
    then count % size examples drawn without replacement by ``seed`` (kept in file order)."""
    passes, rest = divmod(count, size)
    extra = np.sort(np.random.default_rng([seed, MIX_STREAM, source]).permutation(size)[:rest])
    return np.concatenate([np.tile(np.arange(size), passes), extra]).astype(np.int64)


@dataclass(frozen=True)
class SourceDraw:
    """How one training source's examples are used."""

    available: int
    """Examples of the source left for training (after the eval hold-out)."""
    per_epoch: int
    """Examples of it in each epoch (its weight's share)."""
    held_out: int
    """Examples moved to the eval split (data.eval_fraction)."""


@dataclass
class Tokenized:
    """The job's data, ready for the trainer."""

    train: Rows
    """Training rows (one epoch)."""
    eval: Optional[Rows]
    """Eval rows, every eval example once; None without an eval split."""
    draws: list[SourceDraw]
    """Per training source (data.paths counts as one)."""


def _source_examples(job: JobSpec, tok, source: DataSource, index: int, table, indices: np.ndarray) -> list[Piece]:
    """The pieces of the examples at ``indices`` of one source (an index may repeat)."""
    split = source.format == "text"
    where = ".".join(map(str, source.files[0].key[:-1]))  # data.paths, data.sources.1, ...
    done: dict[int, list[Piece]] = {}
    pieces: list[Piece] = []
    for i in indices.tolist():
        if i not in done:
            ids, mask = example_tokens(source.format, job.data.mask_prompt, tok, table[i], f"{where} row {i}")
            windows = _windows(ids, mask, job.data.seq_len, split)
            done[i] = [Piece(w_ids, w_mask, index, k == 0) for k, (w_ids, w_mask) in enumerate(windows)]
        pieces += done[i]
    return pieces


def _read_source(source: DataSource):
    """A source's rows (read_rows); a source without any is a one-line error naming its first file."""
    table = read_rows(source.files)
    if len(table) == 0:
        raise DataError(f"{source.files[0].field}: no examples in {', '.join(f.path for f in source.files)}")
    return table


def tokenize_all(job: JobSpec, tok) -> Tokenized:
    """Read, hold out, mix, tokenize and pack the job's data (no cache)."""
    d, seed = job.data, job.training.seed

    def pack(pieces: list[Piece], n_sources: int) -> Rows:
        return build_rows(pieces, d.seq_len, d.packing, tok.pad_token_id, n_sources)

    sources = d.train_sources()
    tables = [_read_source(s) for s in sources]
    if d.eval_fraction is not None:
        kept, held = zip(*(hold_out(len(t), d.eval_fraction, seed, i) for i, t in enumerate(tables)))
        if not sum(len(h) for h in held):
            raise DataError(f"data.eval_fraction: {d.eval_fraction} of {sum(len(t) for t in tables)} examples holds "
                            "out none (floor of fraction x examples, per source); raise it or give data.eval_paths")
    else:
        kept, held = tuple(np.arange(len(t)) for t in tables), tuple(np.arange(0) for _ in tables)
    per_epoch = mixture_counts([s.weight for s in sources], [len(k) for k in kept])
    pieces: list[Piece] = []
    for i, (source, table) in enumerate(zip(sources, tables)):
        # floor(f x n) < n for f < 0.5: every source keeps examples to draw from
        chosen = kept[i][draw_indices(per_epoch[i], len(kept[i]), seed, i)]
        pieces += _source_examples(job, tok, source, i, table, chosen)
    draws = [SourceDraw(len(k), n, len(h)) for k, n, h in zip(kept, per_epoch, held)]
    if d.eval_fraction is not None:
        eval_pieces = [p for i, (s, t) in enumerate(zip(sources, tables))
                       for p in _source_examples(job, tok, s, i, t, held[i])]
        return Tokenized(pack(pieces, len(sources)), pack(eval_pieces, len(sources)), draws)
    eval_sources = d.eval_split_sources()
    if not eval_sources:
        return Tokenized(pack(pieces, len(sources)), None, draws)
    eval_pieces = []
    for i, source in enumerate(eval_sources):
        table = _read_source(source)
        eval_pieces += _source_examples(job, tok, source, i, table, np.arange(len(table)))
    return Tokenized(pack(pieces, len(sources)), pack(eval_pieces, len(eval_sources)), draws)


def _file_stats(path_text: str) -> tuple:
    path = Path(path_text).resolve()
    if path.is_dir():
        stats = sorted((str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns) for f in path.rglob("*") if f.is_file())
        return (str(path), stats)
    st = path.stat()
    return (str(path), st.st_size, st.st_mtime_ns)


def cache_key(job: JobSpec, tok) -> str:
    """Hash of everything the rows depend on. The seed counts only where it chooses examples (several
    sources, or an eval hold-out): a one-source run keeps its cache across seeds."""
    d = job.data
    sources = d.train_sources()
    described = [[[_file_stats(f.path) for f in s.files], s.format, s.weight] for s in sources]
    evals = [[[_file_stats(f.path) for f in s.files], s.format] for s in d.eval_split_sources()]
    seed = job.training.seed if len(sources) > 1 or d.eval_fraction is not None else None
    blob = json.dumps([CACHE_VERSION, described, evals, d.eval_fraction, seed, d.seq_len, d.packing, d.mask_prompt,
                       tokenizer_fingerprint(tok)])
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _save(path: Path, data: Tokenized) -> None:
    arrays = {f"train_{k}": v for k, v in data.train.arrays().items()}
    if data.eval is not None:
        arrays.update({f"eval_{k}": v for k, v in data.eval.arrays().items()})
    arrays["draws"] = np.array([[s.available, s.per_epoch, s.held_out] for s in data.draws], dtype=np.int64)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _load(path: Path) -> Tokenized:
    with np.load(path) as z:
        def rows(prefix: str) -> Optional[Rows]:
            if f"{prefix}_input_ids" not in z:
                return None
            return Rows(**{f: z[f"{prefix}_{f}"] for f in Rows.__dataclass_fields__})

        draws = [SourceDraw(*map(int, row)) for row in z["draws"]]
        return Tokenized(rows("train"), rows("eval"), draws)  # type: ignore[arg-type]


def prepare_data(job: JobSpec, tok, cache_dir: Path, is_main: bool, barrier: Callable[[], None]) -> Tokenized:
    """Tokenized rows from the cache, built by rank 0 when missing (written atomically)."""
    path = cache_dir / f"{cache_key(job, tok)}.npz"
    if is_main and not path.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        _save(path, tokenize_all(job, tok))
    barrier()
    if not path.exists():
        # output_dir is not shared with rank 0 (node-local disk on a multi-node
        # run): tokenize here; same inputs, same rows.
        return tokenize_all(job, tok)
    return _load(path)


# ---------------------------------------------------------------------------
# the mixture trained on


@dataclass(frozen=True)
class SourceShare:
    """What one training source gave to the steps trained (or planned)."""

    name: str
    """The source's file name (its path where two sources share a file name)."""
    weight: float
    """Its weight in the spec."""
    tokens: int
    """Its tokens in the rows of those steps (padding excluded)."""
    loss_tokens: int
    """Of them, the tokens the loss is computed on."""
    examples: int
    """Examples, counting repeats (an example in two epochs counts twice)."""
    token_share: float
    """Its tokens / all tokens (0 when there are none)."""


def mixture(sources: Sequence[DataSource], counts: SourceCounts) -> list[SourceShare]:
    """The per-source shares of ``counts`` (Batcher.source_counts), named for reports."""
    labels = [s.label for s in sources]
    names = [s.files[0].path if labels.count(label) > 1 else label for s, label in zip(sources, labels)]
    total = int(counts.tokens.sum())
    return [SourceShare(name, s.weight, int(t), int(lt), int(e), int(t) / total if total else 0.0)
            for name, s, t, lt, e in zip(names, sources, counts.tokens, counts.loss_tokens, counts.examples)]


def render_mixture(shares: Sequence[SourceShare]) -> str:
    """One line: 'mixture: a.jsonl 62.1 % of tokens (weight 0.6), b.jsonl 37.9 % of tokens (weight 0.4)'."""
    return "mixture: " + ", ".join(f"{s.name} {100 * s.token_share:.1f} % of tokens (weight {s.weight:g})" for s in shares)


def render_data(job: JobSpec, data: Tokenized, batcher: "Batcher", total_steps: int) -> list[str]:
    """What the trainer prints at the start: rows and epochs, the eval split, and (several sources) the
    mixture the run's ``total_steps`` will train on."""
    epochs = total_steps * batcher.global_batch / data.train.n
    per_epoch = sum(d.per_epoch for d in data.draws)
    lines = [f"data: {data.train.n} rows of {job.data.seq_len} tokens from {per_epoch} examples per epoch; "
             f"{total_steps} steps x {batcher.global_batch} rows = {epochs:.2f} epochs"]
    if data.eval is not None:
        how = (f"data.eval_fraction {job.data.eval_fraction}: {sum(d.held_out for d in data.draws)} examples held out"
               if job.data.eval_fraction is not None else f"{int(data.eval.source_examples.sum())} examples")
        lines.append(f"eval: {data.eval.n} rows, {int(data.eval.loss_tokens().sum())} loss tokens ({how})")
    sources = job.data.train_sources()
    if len(sources) > 1:
        lines.append(render_mixture(mixture(sources, batcher.source_counts(total_steps)))
                     + f" (the {total_steps} steps planned)")
    return lines


# ---------------------------------------------------------------------------
# batches


@dataclass
class Batcher:
    """Which rows each rank uses for each micro batch of each optimizer step (pure function of seed and step)."""

    rows: Rows
    seed: int
    micro_batch: int
    grad_accum: int
    world: int

    def __post_init__(self) -> None:
        self._loss_tokens = self.rows.loss_tokens()
        self._perms: dict[int, np.ndarray] = {}

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world

    def steps_for_epochs(self, epochs: float) -> int:
        return max(1, math.ceil(epochs * self.rows.n / self.global_batch))

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.rows.n)}
        return self._perms[epoch]

    def step_rows(self, step: int) -> np.ndarray:
        """The global batch of optimizer step ``step`` (row indices, length G)."""
        if getattr(self, "_last", (None,))[0] == step:
            return self._last[1]  # asked once per micro batch: compute once per step
        G, N = self.global_batch, self.rows.n
        out = np.empty(G, dtype=np.int64)
        for k in range(G):
            p = step * G + k
            out[k] = self._perm(p // N)[p % N]
        self._last = (step, out)
        return out

    def micro_rows(self, step: int, micro: int, rank: int) -> np.ndarray:
        start = (micro * self.world + rank) * self.micro_batch
        return self.step_rows(step)[start:start + self.micro_batch]

    def step_loss_tokens(self, step: int) -> int:
        """Loss tokens (not padding, not masked prompt) of the whole optimizer step over all ranks: the loss
        divides by them, and tokens/s counts them."""
        return int(self._loss_tokens[self.step_rows(step)].sum())

    def row_uses(self, steps: int) -> np.ndarray:
        """How many times each row is used by the first ``steps`` optimizer steps: once per finished
        epoch of the stream, plus once for the rows already taken from the epoch under way."""
        full, rest = divmod(steps * self.global_batch, self.rows.n)
        uses = np.full(self.rows.n, full, dtype=np.int64)
        uses[self._perm(full)[:rest]] += 1
        return uses

    def source_counts(self, steps: int) -> SourceCounts:
        """Tokens, loss tokens and examples per source in the first ``steps`` optimizer steps."""
        return self.rows.source_counts(self.row_uses(steps))

    def micro_batch_arrays(self, step: int, micro: int, rank: int) -> dict[str, np.ndarray]:
        idx = self.micro_rows(step, micro, rank)
        return {"input_ids": self.rows.input_ids[idx], "position_ids": self.rows.position_ids[idx], "targets": self.rows.targets[idx]}


@dataclass
class EvalBatches:
    """One rank's share of the eval split: micro batches that, over all ranks, hold every eval row once.

    Row j goes to micro batch j // (mb x world) of rank (j // mb) % world. Every rank runs the same
    number of micro batches (the collectives of a sharded model must match), so the last ones are
    filled with padding rows: pad tokens, all targets IGNORE, contributing no loss and no loss
    tokens. The eval loss is then (sum over ranks of each rank's summed token losses) /
    ``loss_tokens``: the same number for any world size and micro batch.
    """

    rows: Rows
    """The eval rows (Tokenized.eval)."""
    micro_batch: int
    """Sequences per micro batch (JobSpec.eval_micro_batch)."""
    world: int
    """Ranks."""
    pad_id: int
    """Token id of the padding rows (their targets are all IGNORE, so any id would do)."""

    @property
    def micro_batches(self) -> int:
        """Micro batches per rank."""
        return max(1, math.ceil(self.rows.n / (self.micro_batch * self.world)))

    @property
    def loss_tokens(self) -> int:
        """Loss tokens of the whole eval split (the eval loss divides by them)."""
        return int(self.rows.loss_tokens().sum())

    def micro_rows(self, micro: int, rank: int) -> np.ndarray:
        """Row indices of one micro batch of ``rank``; -1 marks a padding row."""
        start = (micro * self.world + rank) * self.micro_batch
        idx = np.arange(start, start + self.micro_batch)
        return np.where(idx < self.rows.n, idx, -1)

    def micro_batch_arrays(self, micro: int, rank: int) -> dict[str, np.ndarray]:
        idx = self.micro_rows(micro, rank)
        real = idx >= 0
        seq = self.rows.input_ids.shape[1]
        out = {"input_ids": np.full((len(idx), seq), self.pad_id, dtype=np.int64),
               "position_ids": np.tile(np.arange(seq, dtype=np.int64), (len(idx), 1)),
               "targets": np.full((len(idx), seq), IGNORE, dtype=np.int64)}
        for name, array in (("input_ids", self.rows.input_ids), ("position_ids", self.rows.position_ids),
                            ("targets", self.rows.targets)):
            out[name][real] = array[idx[real]]
        return out
