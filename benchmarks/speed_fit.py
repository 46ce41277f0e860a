"""Fit the planner's speed model (planner.SpeedModel) on measured runs, and check it on others.

    PYTHONPATH=$PWD python benchmarks/speed_fit.py             # the committed H100 results (defaults below)
    PYTHONPATH=$PWD python benchmarks/speed_fit.py --fit A.json B.json --check C.json --check-rows NAME,...

Reads measured tokens/s from the result files the benchmarks write (memory_accuracy.py,
throughput.py, planner_quality.py and knob_grid.py JSON, and the levers probe's quick.json;
the format is recognized by its rows), rebuilds each run's job spec with the levers it ran
with (engine, compiled layers, attention kernel: recorded by the newer files; files from
before the levers existed ran DeepSpeed's engine, eager layers and sdpa unless their
overrides say otherwise), and solves for the SpeedModel fields in --fields by least squares
on the relative step time of the ``--fit`` rows (the other constants stay as they are; rows
a memory-accuracy file marks held_out, rows named in --check-rows, and rows with another
attention kernel than sdpa or flex_attention, are only checked). Each row's step time is
linear in the fields its own levers use and independent of the others (eager layers never
read compiled_seconds_per_layer_pass, sdpa never flex_attention_mfu), so one solve fits each
path's constants on that path's rows. It prints the fitted constants and every row's error
before and after, for the fit rows and the ``--check`` rows (which are never fitted on).
Nothing is written: copy the printed constants into planner.SpeedModel.

The step time the model predicts is linear in each fittable constant (FITTABLE: a rate such as
peak_mfu enters as its reciprocal; planner.micro_step_seconds is FLOP time + memory traffic +
fixed overhead), so each row contributes one linear equation, found by evaluating
planner.step_seconds with those constants switched on one at a time.

Tokens: the planner predicts processed tokens per second (micro batch x seq_len x GPUs per
micro step, padding included), as throughput.py and planner_quality.py measure them. The
memory-accuracy runs recorded the trainer's own tokens_per_s of their last step, which counts
loss-bearing tokens only; those rows are converted exactly: their synthetic data is rebuilt
(common.write_data is seeded), tokenized with the same byte tokenizer, and the last
step's loss tokens counted with the trainer's Batcher.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import Config, job_as_ran, make_job, write_data  # noqa: E402
from orchestrator import planner  # noqa: E402
from orchestrator.spec import JobSpec  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_FIT = [*(RESULTS / "device" / f"h100-call{i}" / "memory_accuracy.json" for i in (1, 2, 3)),
               RESULTS / "throughput.json", RESULTS / "device" / "h100-call5" / "quick.json",
               *sorted((RESULTS / "device").glob("*/knob_grid.json"))]
"""The committed H100 results; every knob grid stored under benchmarks/results/device/<call>/ joins them, so
re-fitting on new measurements is this one command."""
DEFAULT_CHECK = [RESULTS / "device" / "h100-call4" / "planner_quality.json"]
DEFAULT_CHECK_ROWS = ("l1-flex",)
"""Rows of the --fit files that are only checked: the LoRA 8B run of the compiled/flex path, so
that path's two constants are fitted on its two QLoRA 8B runs (micro batch 1 and 4) and checked
on a run of another method."""
FITTABLE = {"peak_mfu": True, "attention_mfu": True, "flex_attention_mfu": True, "hbm_bytes_per_s": True,
            "seconds_per_layer_pass": False, "compiled_seconds_per_layer_pass": False, "seconds_per_step": False,
            "zero3_seconds_per_layer_pass": False}
"""SpeedModel fields the step time is linear in: True where it enters as its reciprocal (a rate)."""
DEFAULT_FIELDS = ("attention_mfu", "seconds_per_layer_pass", "flex_attention_mfu", "compiled_seconds_per_layer_pass")
"""Fitted by default: per path (eager layers with sdpa; compiled layers with flex attention), an
attention rate and a fixed cost per layer and pass. peak_mfu is not: the runs so far cannot
separate it from the attention and traffic terms (fits with peak_mfu fixed anywhere in 0.5-0.8
are equally good), so it stays at a physical value; a grid of micro batch x checkpointing on
several shapes may pin it (--fields)."""
FIT_ATTENTION = ("sdpa", "flex_attention")
"""Kernels whose rows are fitted on; others (eager) are only checked."""


@dataclass(frozen=True)
class Measured:
    """One measured run: the job as it ran and its processed tokens per second."""

    name: str
    """Config, case or job--strategy name from the result file."""
    source: str
    """The result file it came from."""
    job: JobSpec
    """The job spec the run used (knobs concrete)."""
    strategy: str
    """The strategy it ran with."""
    tokens_per_s: float
    """Processed tokens per second (micro batch x seq_len x GPUs per micro step)."""
    held_out: bool = False
    """Never fitted on, whichever list its file was given in: memory-accuracy rows keep that
    benchmark's own held-out role, so the memory and the speed model are checked on the same runs."""

    def step_seconds(self) -> float:
        return self.job.training.global_batch_size * self.job.data.seq_len / self.tokens_per_s


# ---------------------------------------------------------------------------
# Reading result files


def processed_per_loss_token(job: JobSpec, step: int) -> float:
    """Processed tokens / loss tokens of optimizer step ``step`` (0-based) of a memory-accuracy run."""
    from orchestrator import data as D

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.jsonl"
        write_data(path, job)
        job = job.model_copy(update={"data": job.data.model_copy(update={"paths": [str(path)]})})
        rows = D.tokenize_all(job, D.load_tokenizer(job, job.shape().vocab_size)).train
    t = job.training
    batcher = D.Batcher(rows, t.seed, t.micro_batch_size, job.grad_accum(), job.hardware.world_size)
    return t.global_batch_size * job.data.seq_len / batcher.step_loss_tokens(step)


def from_memory_accuracy(path: Path, rows: list[dict]) -> list[Measured]:
    out = []
    for r in rows:
        if not r.get("tokens_per_s"):
            continue
        cfg = Config(r["config"], r["role"], r["strategy"], r["gpus"], tuple(r["overrides"]))
        job = job_as_ran(make_job(cfg, Path("/tmp/unused"), Path("/tmp/unused.jsonl")), r)
        # the trainer's tokens_per_s with log_every 1 is the last step's loss tokens over its time
        ratio = processed_per_loss_token(job, job.training.max_steps - 1)
        out.append(Measured(cfg.name, str(path), job, cfg.strategy, r["tokens_per_s"] * ratio, r["role"] == "held_out"))
    return out


def from_throughput(path: Path, stored: dict) -> list[Measured]:
    from benchmarks.throughput import Case

    fields = {f.name for f in dataclasses.fields(Case)} - {"name"}
    out = []
    for r in stored["rows"]:
        side = r.get("orch") or {}
        if not side.get("tokens_per_s"):
            continue
        case = Case(r["case"], **{k: r[k] for k in fields if k in r})
        job = job_as_ran(make_job(case.config(r["steps"]), Path("/tmp/unused"), Path("/tmp/unused.jsonl")), side)
        out.append(Measured(case.name, str(path), job, case.strategy, side["tokens_per_s"]))
    return out


def from_planner_quality(path: Path, stored: dict) -> list[Measured]:
    from benchmarks.planner_quality import Job

    out = []
    for r in stored["rows"]:
        spec = Job(r["job"], r["method"], r["micro_batch"], model=r["model"], seq_len=r["seq_len"])
        for strategy, side in r["strategies"].items():
            if not side.get("tokens_per_s"):
                continue
            case = spec.case(strategy)
            job = job_as_ran(make_job(case.config(stored["steps"]), Path("/tmp/unused"), Path("/tmp/unused.jsonl")), side)
            out.append(Measured(case.name, str(path), job, strategy, side["tokens_per_s"]))
    return out


def from_levers_probe(path: Path, rows: list[dict]) -> list[Measured]:
    """The untracked levers probe of issue 16 (h100-call5/quick.json, made by quick_probe.py.txt next to it):
    memory-accuracy configs on one GPU with ``steady_tok_s`` (processed tokens over the steps after the
    third) and the engine and compiled variants from summary.json; attention from the overrides."""
    out = []
    for r in rows:
        if not r.get("steady_tok_s"):
            continue
        cfg = Config(r["config"], "probe", "single_gpu", 1, tuple(r["overrides"]))
        job = job_as_ran(make_job(cfg, Path("/tmp/unused"), Path("/tmp/unused.jsonl")), r)
        out.append(Measured(cfg.name, str(path), job, cfg.strategy, r["steady_tok_s"]))
    return out


def from_knob_grid(path: Path, stored: dict) -> list[Measured]:
    """benchmarks/knob_grid.py: every measured point of every job (the levers each ran with are recorded)."""
    from benchmarks.knob_grid import point_job

    out = []
    for r in stored["rows"]:
        for point in r.get("points", []):
            if not point.get("tokens_per_s"):
                continue
            job = job_as_ran(point_job(r["job"], point["micro_batch_size"], point["gradient_checkpointing"]), point)
            out.append(Measured(f"{r['job']}-mb{point['micro_batch_size']}-ckpt{int(point['gradient_checkpointing'])}",
                                str(path), job, "single_gpu", point["tokens_per_s"]))
    return out


def load(path: Path) -> list[Measured]:
    """Measured runs of one result file, whichever benchmark wrote it."""
    stored = json.loads(Path(path).read_text())
    if isinstance(stored, list):
        return from_levers_probe(path, stored)
    rows = stored.get("rows", [])
    if rows and "points" in rows[0]:
        return from_knob_grid(path, stored)
    if rows and "config" in rows[0]:
        return from_memory_accuracy(path, rows)
    if rows and "case" in rows[0]:
        return from_throughput(path, stored)
    if rows and "strategies" in rows[0]:
        return from_planner_quality(path, stored)
    raise SystemExit(f"{path}: not a memory_accuracy, throughput, planner_quality, knob_grid or levers probe result file")


# ---------------------------------------------------------------------------
# Fitting


def predict(m: Measured, speed: planner.SpeedModel) -> float:
    """Predicted step seconds of a measured run."""
    return planner.step_seconds(m.job, m.strategy, m.job.shape(), speed)


def linear_terms(m: Measured, speed: planner.SpeedModel, fields: Sequence[str]) -> tuple[list[float], float]:
    """(terms, rest) with predicted step seconds = sum of term x (1 / value if a rate, else value) + rest."""
    off = dataclasses.replace(speed, **{f: math.inf if FITTABLE[f] else 0.0 for f in fields})
    rest = predict(m, off)
    return [predict(m, dataclasses.replace(off, **{f: 1.0})) - rest for f in fields], rest


def fit(rows: Sequence[Measured], speed: planner.SpeedModel, fields: Sequence[str] = DEFAULT_FIELDS) -> planner.SpeedModel:
    """SpeedModel with ``fields`` minimizing the squared relative step-time error over ``rows``."""
    import numpy as np

    lhs, rhs = [], []
    for m in rows:
        terms, rest = linear_terms(m, speed, fields)
        t = m.step_seconds()
        lhs.append([x / t for x in terms])
        rhs.append((t - rest) / t)
    solution, *_ = np.linalg.lstsq(np.array(lhs), np.array(rhs), rcond=None)
    values = {f: float(1 / x if FITTABLE[f] else x) for f, x in zip(fields, solution)}
    return dataclasses.replace(speed, **{f: float(f"{v:.3g}") for f, v in values.items()})


def error_pct(m: Measured, speed: planner.SpeedModel) -> float:
    """(predicted - measured) / measured tokens/s, %."""
    return 100.0 * (m.step_seconds() / predict(m, speed) - 1)


def summary(rows: Sequence[Measured], speed: planner.SpeedModel) -> Optional[str]:
    errs = [abs(error_pct(m, speed)) for m in rows]
    return f"n={len(errs)} median |err| {statistics.median(errs):.1f} %, worst {max(errs):.1f} %" if errs else None


def report(fit_rows: Sequence[Measured], check_rows: Sequence[Measured], old: planner.SpeedModel,
           new: planner.SpeedModel, fields: Sequence[str]) -> str:
    lines = ["fitted constants (planner.SpeedModel):"]
    for name in fields:
        lines.append(f"  {name:<24} {getattr(old, name)!r:>10} -> {getattr(new, name)!r}")
    lines.append("")
    lines.append(f"{'run':<40} {'set':<5} {'strategy':<24} {'measured':>9} {'old pred':>9} {'new pred':>9} {'new err':>8}")
    for label, rows in (("fit", fit_rows), ("check", check_rows)):
        for m in rows:
            tokens = m.job.training.global_batch_size * m.job.data.seq_len
            lines.append(f"{m.name:<40} {label:<5} {m.strategy:<24} {m.tokens_per_s:>9.0f} "
                         f"{tokens / predict(m, old):>9.0f} {tokens / predict(m, new):>9.0f} {error_pct(m, new):>+7.1f}%")
    for label, rows in (("fit", fit_rows), ("check", check_rows)):
        before, after = summary(rows, old), summary(rows, new)
        if after:
            lines.append(f"{label} rows: before {before}; after {after}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fit", nargs="+", type=Path, default=DEFAULT_FIT, help="result files to fit on")
    ap.add_argument("--check", nargs="*", type=Path, default=DEFAULT_CHECK, help="result files only checked")
    ap.add_argument("--check-rows", default=",".join(DEFAULT_CHECK_ROWS),
                    help="comma-separated names of rows in the --fit files that are only checked")
    ap.add_argument("--fields", default=",".join(DEFAULT_FIELDS),
                    help=f"comma-separated SpeedModel fields to fit, of {', '.join(FITTABLE)}")
    args = ap.parse_args(argv)
    fields = args.fields.split(",")
    unknown = [f for f in fields if f not in FITTABLE]
    if unknown:
        print(f"--fields: cannot fit {', '.join(unknown)}; choose from {', '.join(FITTABLE)}", file=sys.stderr)
        return 2
    given = [m for path in args.fit for m in load(path)]
    only_checked = set(filter(None, args.check_rows.split(",")))
    # attention_mfu describes sdpa's kernel, flex_attention_mfu flex's: rows with other kernels are only checked
    fit_rows = [m for m in given if not m.held_out and m.name not in only_checked
                and m.job.model.attn_implementation in FIT_ATTENTION]
    check_rows = [m for m in given if m not in fit_rows] + [m for path in args.check for m in load(path)]
    if len(fit_rows) < len(fields):
        print(f"{len(fit_rows)} measured rows cannot fit {len(fields)} constants", file=sys.stderr)
        return 2
    new = fit(fit_rows, planner.SPEED, fields)
    print(report(fit_rows, check_rows, planner.SPEED, new, fields))
    return 0


if __name__ == "__main__":
    sys.exit(main())
