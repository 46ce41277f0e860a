"""Training data: tokenizer, examples -> token rows (packed), deterministic batches.

Imported only by the trainer. Steps:

1. Read local JSONL / Parquet / ``save_to_disk`` folders with ``datasets``.
2. Turn each example into token ids plus a loss mask (format text, alpaca or
   chat; prompt tokens masked when ``data.mask_prompt``).
3. Pack examples into rows of ``seq_len`` tokens (or one example per row). In a
   packed row ``position_ids`` restart at 0 for every example and targets never
   point across an example border, so no example learns from its neighbour.
   Attention: with no attention mask and restarting position_ids, transformers
   builds per-example attention itself -- varlen kernels for flash_attention_2
   (no extra memory), a block-diagonal causal 4D mask for sdpa/eager. The sdpa
   mask costs micro_batch x seq_len^2 bytes (4 MiB per row at 2048) and moves
   sdpa from the flash kernel to the memory-efficient one; we accept that for
   correctness, and flash_attention_2 is the fast choice for long packed rows.
4. Cache the rows in ``<output_dir>/data_cache/<hash>.npz`` (hash of files,
   sizes, mtimes, format, seq_len, packing, masking and tokenizer), built by
   rank 0, read by all.
5. Batches: optimizer step s uses rows ``[s*G, (s+1)*G)`` of an endless stream
   that is a fresh seeded permutation of all rows per epoch; micro batch m of
   rank r takes rows ``(m*world + r)*mb ...``. The batch is a pure function of
   (seed, step), so a resumed run needs only the step number, and every rank
   knows the loss-token count of the whole optimizer step without talking to
   the others.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from orchestrator.datacheck import row_problem
from orchestrator.errors import Exit, OrchError
from orchestrator.spec import JobSpec

CACHE_VERSION = 1
IGNORE = -100

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


def read_rows(paths: list[str]):
    """All rows of the data files as one ``datasets.Dataset``."""
    import datasets

    parts = []
    for i, p in enumerate(paths):
        path = Path(p)
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
            raise DataError(f"data.paths.{i}: cannot read {p!r}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
        parts.append(ds)
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _bos(tok) -> list[int]:
    return [tok.bos_token_id] if tok.bos_token_id is not None else []


def example_tokens(job: JobSpec, tok, row: dict, where: str) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of one example; mask 1 = the model learns to predict this token."""
    fmt, mask_prompt = job.data.format, job.data.mask_prompt
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


@dataclass
class Rows:
    """Token rows ready for training (all arrays [N, seq_len])."""

    input_ids: np.ndarray
    position_ids: np.ndarray
    targets: np.ndarray
    """Next-token target at each position, IGNORE where masked, padded, or across an example border."""

    @property
    def n(self) -> int:
        return int(self.input_ids.shape[0])

    def loss_tokens(self) -> np.ndarray:
        """Loss tokens per row."""
        return (self.targets != IGNORE).sum(axis=1)


def _windows(ids: list[int], mask: list[int], seq_len: int, split: bool) -> list[tuple[list[int], list[int]]]:
    """An example longer than seq_len: split into windows (text) or truncated (prompt/response formats)."""
    if len(ids) <= seq_len:
        return [(ids, mask)]
    if not split:
        return [(ids[:seq_len], mask[:seq_len])]
    return [(ids[i:i + seq_len], mask[i:i + seq_len]) for i in range(0, len(ids), seq_len) if len(ids) - i >= 2]


def build_rows(examples: list[tuple[list[int], list[int]]], seq_len: int, packing: bool, pad_id: int) -> Rows:
    """Greedy in-order packing (or one example per row); pads fill the rest of a row."""
    rows: list[list[tuple[list[int], list[int]]]] = []
    cur: list[tuple[list[int], list[int]]] = []
    used = 0
    for ex in examples:
        n = len(ex[0])
        if cur and (not packing or used + n > seq_len):
            rows.append(cur)
            cur, used = [], 0
        cur.append(ex)
        used += n
    if cur:
        rows.append(cur)
    N = len(rows)
    inp = np.full((N, seq_len), pad_id, dtype=np.int64)
    pos = np.zeros((N, seq_len), dtype=np.int64)
    tgt = np.full((N, seq_len), IGNORE, dtype=np.int64)
    for r, parts in enumerate(rows):
        at = 0
        for ids, mask in parts:
            n = len(ids)
            inp[r, at:at + n] = ids
            pos[r, at:at + n] = np.arange(n)
            # target at t is token t+1 of the same example, if that token is in the loss
            nxt = np.array(ids[1:], dtype=np.int64)
            keep = np.array(mask[1:], dtype=bool)
            tgt[r, at:at + n - 1] = np.where(keep, nxt, IGNORE)
            at += n
        # padding: positions keep counting (one more "example" nobody attends to
        # from a real token, causal), targets ignored
        if at < seq_len:
            pos[r, at:] = np.arange(seq_len - at)
    return Rows(inp, pos, tgt)


def cache_key(job: JobSpec, tok) -> str:
    files = []
    for p in job.data.paths:
        path = Path(p).resolve()
        if path.is_dir():
            stats = sorted((str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns) for f in path.rglob("*") if f.is_file())
            files.append((str(path), stats))
        else:
            st = path.stat()
            files.append((str(path), st.st_size, st.st_mtime_ns))
    d = job.data
    blob = json.dumps([CACHE_VERSION, files, d.format, d.seq_len, d.packing, d.mask_prompt, tokenizer_fingerprint(tok)])
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def tokenize_all(job: JobSpec, tok) -> Rows:
    table = read_rows(job.data.paths)
    examples = []
    split = job.data.format == "text"
    for i, row in enumerate(table):
        ids, mask = example_tokens(job, tok, row, f"data row {i}")
        examples.extend(_windows(ids, mask, job.data.seq_len, split))
    if not examples:
        raise DataError(f"data.paths: no examples in {', '.join(job.data.paths)}")
    return build_rows(examples, job.data.seq_len, job.data.packing, tok.pad_token_id)


def prepare_rows(job: JobSpec, tok, cache_dir: Path, is_main: bool, barrier: Callable[[], None]) -> Rows:
    """Tokenized rows from the cache, built by rank 0 when missing (written atomically)."""
    path = cache_dir / f"{cache_key(job, tok)}.npz"
    if is_main and not path.exists():
        rows = tokenize_all(job, tok)
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez(tmp, input_ids=rows.input_ids, position_ids=rows.position_ids, targets=rows.targets)
        os.replace(tmp, path)
    barrier()
    if not path.exists():
        # output_dir is not shared with rank 0 (node-local disk on a multi-node
        # run): tokenize here; same inputs, same rows.
        return tokenize_all(job, tok)
    with np.load(path) as z:
        return Rows(z["input_ids"], z["position_ids"], z["targets"])


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

    def micro_batch_arrays(self, step: int, micro: int, rank: int) -> dict[str, np.ndarray]:
        idx = self.micro_rows(step, micro, rank)
        return {"input_ids": self.rows.input_ids[idx], "position_ids": self.rows.position_ids[idx], "targets": self.rows.targets[idx]}
