"""Progress of a run, read from its output folder: what `orch status` shows (torch-free).

The trainer writes three files into ``training.output_dir`` (rank 0):

* ``run.json`` (:class:`RunInfo`) when training starts, again after each resume: the step it
  starts from, the steps in total and the predicted peaks;
* ``metrics.jsonl``: one line per rank at each log step (``step``, ``rank``, ``loss``,
  ``tokens_per_s``, ``mem_peak`` = torch.cuda.max_memory_allocated or null on the CPU, ``time``,
  ...); a line with an ``eval_loss`` key is an eval of the whole eval split at that ``step``;
* ``summary.json`` at the end (``steps``, ``final_loss``, ``peak_allocated_bytes``,
  ``predicted_peak_bytes``, ...).

:func:`read_progress` turns whatever of them exists into a :class:`Progress`, :func:`render_progress`
into the lines `orch status` prints. Nothing here talks to Slurm (orchestrator/submit.py finds the
output folder of a Slurm job).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from orchestrator.catalog import GIB

RUN_INFO = "run.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"


@dataclass(frozen=True)
class RunInfo:
    """What a run is about to do, written by the trainer when training starts (or resumes)."""

    job: str
    """The job's name."""
    strategy: str
    """The strategy it trains with."""
    world_size: int
    """Trainer processes (GPUs)."""
    total_steps: int
    """Optimizer steps of the whole run (training.max_steps, or what training.epochs make of the data)."""
    start_step: int
    """The step this start begins at (0, or the resumed checkpoint's)."""
    start_time: float
    """When training steps began (seconds since the epoch), for the time per step."""
    predicted_peak_bytes: int
    """orch's predicted training peak per GPU (memory.estimate)."""
    predicted_eval_peak_bytes: int
    """Its predicted eval peak per GPU (0 without an eval split)."""

    def write(self, out: Path) -> None:
        """Write ``out/run.json`` atomically (a reader never sees half a file)."""
        tmp = out / f"{RUN_INFO}.tmp{os.getpid()}"
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.replace(tmp, out / RUN_INFO)

    @classmethod
    def read(cls, out: Path) -> Optional["RunInfo"]:
        """``out/run.json``, or None when there is none (a run that has not started, or an older orch's)."""
        data = _json_file(out / RUN_INFO)
        if not isinstance(data, dict):
            return None
        try:
            return cls(**{name: data[name] for name in cls.__dataclass_fields__})
        except (KeyError, TypeError):
            return None


@dataclass(frozen=True)
class Progress:
    """Where a run stands, from its output folder."""

    run_dir: Path
    """The run's output folder."""
    job: Optional[str]
    """The job's name (None before the trainer wrote run.json)."""
    finished: bool
    """summary.json says the run trained all its steps."""
    step: Optional[int]
    """Optimizer steps done, as last logged (None when nothing was logged yet)."""
    total_steps: Optional[int]
    """Steps of the whole run (None when unknown)."""
    loss: Optional[float]
    """The latest logged training loss."""
    eval_loss: Optional[float]
    """The latest eval loss (None when no eval ran yet, or the run has no eval split)."""
    eval_step: Optional[int]
    """The step of that eval."""
    tokens_per_s: Optional[float]
    """The latest logged training throughput (loss tokens per second)."""
    eta_s: Optional[float]
    """Seconds to the last step at the pace of this start (None when finished or unknown)."""
    measured_peak_bytes: Optional[int]
    """Largest torch.cuda.max_memory_allocated over ranks so far (None on the CPU)."""
    predicted_peak_bytes: Optional[int]
    """orch's predicted training peak per GPU."""


def _json_file(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _records(path: Path) -> list[dict]:
    """The lines of metrics.jsonl that parse (the line being written when the file is read may not)."""
    try:
        text = path.read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            out.append(record)
    return out


def read_progress(run_dir: Path) -> Progress:
    """The progress of the run in ``run_dir`` from run.json, metrics.jsonl and summary.json."""
    info = RunInfo.read(run_dir)
    summary = _json_file(run_dir / SUMMARY)
    summary = summary if isinstance(summary, dict) else {}
    records = _records(run_dir / METRICS)
    train = [r for r in records if r.get("rank") == 0 and "eval_loss" not in r]
    evals = [r for r in records if "eval_loss" in r]
    last = train[-1] if train else None
    total = info.total_steps if info else None
    step = last["step"] if last else summary.get("steps")
    # a run that early stopping ended is finished before its last step
    finished = bool(summary) and step is not None and (total is None or summary.get("steps") == total
                                                       or summary.get("early_stopped") is True)
    eta = None
    if info and last and not finished and last["step"] > info.start_step and isinstance(last.get("time"), (int, float)):
        per_step = (last["time"] - info.start_time) / (last["step"] - info.start_step)
        eta = max(0.0, per_step * (info.total_steps - last["step"]))
    peaks = [r["mem_peak"] for r in records if isinstance(r.get("mem_peak"), int)]
    measured = max(peaks) if peaks else summary.get("peak_allocated_bytes")
    predicted = info.predicted_peak_bytes if info else summary.get("predicted_peak_bytes")
    return Progress(
        run_dir=run_dir, job=info.job if info else summary.get("job"), finished=finished, step=step, total_steps=total,
        loss=last.get("loss") if last else summary.get("final_loss"),
        eval_loss=evals[-1]["eval_loss"] if evals else None, eval_step=evals[-1]["step"] if evals else None,
        tokens_per_s=last.get("tokens_per_s") if last else summary.get("tokens_per_s"),
        eta_s=eta, measured_peak_bytes=measured, predicted_peak_bytes=predicted,
    )


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


def render_progress(p: Progress) -> str:
    """Two or three lines: the run folder, steps / loss / eval loss / tokens/s / ETA, peak memory."""
    head = f"run: {p.run_dir}" + (f" ({p.job})" if p.job else "")
    if p.step is None:
        return f"{head}\n  no steps logged yet (queued, loading the model, or before the first log step)"
    total = f" / {p.total_steps} ({100 * p.step / p.total_steps:.0f} %)" if p.total_steps else ""
    parts = [f"step {p.step}{total}" + (", finished" if p.finished else "")]
    if p.loss is not None:
        parts.append(f"loss {p.loss:.4f}")
    if p.eval_loss is not None:
        parts.append(f"eval loss {p.eval_loss:.4f} (step {p.eval_step})")
    if p.tokens_per_s is not None:
        parts.append(f"{p.tokens_per_s:,.0f} tok/s")
    if p.eta_s is not None:
        parts.append(f"ETA {_duration(p.eta_s)}")
    lines = [head, "  " + ", ".join(parts)]
    predicted = "n/a" if p.predicted_peak_bytes is None else f"{p.predicted_peak_bytes / GIB:.2f} GiB"
    if p.measured_peak_bytes is None:
        lines.append(f"  peak memory: measured n/a (no GPU counter: a CPU run), predicted {predicted}")
    else:
        error = ""
        if p.predicted_peak_bytes:
            error = f" ({100 * (p.measured_peak_bytes - p.predicted_peak_bytes) / p.predicted_peak_bytes:+.1f} % vs predicted)"
        lines.append(f"  peak memory: measured {p.measured_peak_bytes / GIB:.2f} GiB (max over ranks), "
                     f"predicted {predicted}{error}")
    return "\n".join(lines)
