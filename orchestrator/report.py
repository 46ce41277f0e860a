"""What a training run reports: a metrics record per log step (``metrics.jsonl`` and wandb), the
summary at the end (``summary.json`` and the lines printed), the memory plot (``memory.png``) and the
one-line out-of-memory message.

Trainer-side and torch-free: the recipe (``orchestrator/recipe.py``) measures, this module writes.
matplotlib and wandb are imported only where they are used.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from orchestrator.catalog import GIB
from orchestrator.spec import JobSpec

if TYPE_CHECKING:
    from orchestrator.data import SourceShare


# ---------------------------------------------------------------------------
# what is measured


@dataclass(frozen=True)
class RankMemory:
    """Memory statistics of one rank (bytes; None where the device has no such counter).
    These are the ``per_rank`` entries of summary.json."""

    rank: int
    load_peak_allocated: Optional[int] = None
    """torch.cuda.max_memory_allocated after model load + engine init (None on CPU)."""
    peak_allocated: Optional[int] = None
    """torch.cuda.max_memory_allocated during training (None on CPU)."""
    peak_reserved: Optional[int] = None
    """torch.cuda.max_memory_reserved during training (None on CPU)."""
    cpu_rss_peak: Optional[int] = None
    """Peak resident set size of the process (ru_maxrss), all phases."""
    cpu_rss_after_load: Optional[int] = None
    """Resident set size right after load + engine init."""
    params_bytes_local: Optional[int] = None
    """Bytes of model parameters this rank holds after engine init (its ZeRO-3 partition, or everything)."""
    params_bytes_full: Optional[int] = None
    """Bytes of all model parameters, unpartitioned."""
    params_bytes_local_built: Optional[int] = None
    """Bytes of model parameters this rank holds right after the model is built/loaded, before
    deepspeed.initialize (ZeRO-3 lora/full: already its partition; otherwise the whole model)."""
    quantized_bytes_local_built: Optional[int] = None
    """Of params_bytes_local_built: the packed 4-bit weights (qlora; under ZeRO-3 already this rank's partition)."""
    build_peak_allocated: Optional[int] = None
    """torch.cuda.max_memory_allocated right after the model is built/loaded, before deepspeed.initialize
    (None on CPU)."""
    build_peak_sampled: Optional[int] = None
    """CPU: the largest bytes of live CPU tensors the build added, sampled at its peaks
    (modeling.LiveTensorBytes); None on a GPU, where build_peak_allocated is the allocator's."""
    quantized_bytes_local: Optional[int] = None
    """Of params_bytes_local: the packed 4-bit weights (qlora)."""
    quantized_bytes_full: Optional[int] = None
    """Of params_bytes_full: the packed 4-bit weights (qlora)."""


@dataclass(frozen=True)
class StepRecord:
    """One line of metrics.jsonl: one rank at one log step."""

    step: int
    """Optimizer steps done."""
    rank: int
    loss: Optional[float]
    """Mean token loss of the step over all ranks (the same on every rank)."""
    lr: Optional[float]
    """Learning rate of the step."""
    tokens_per_s: Optional[float]
    """Loss tokens per second of the whole job since the previous log step."""
    mem_allocated: Optional[int]
    """torch.cuda.memory_allocated (None on the CPU)."""
    mem_reserved: Optional[int]
    """torch.cuda.memory_reserved (None on the CPU)."""
    mem_peak: Optional[int]
    """torch.cuda.max_memory_allocated so far (None on the CPU)."""
    cpu_rss: int
    """Resident set size of the process."""
    time: float
    """Unix time of the record."""
    source_tokens: dict[str, int] = field(default_factory=dict)
    """Tokens trained so far per training source (data.SourceShare.tokens, by source name)."""


@dataclass(frozen=True)
class Prediction:
    """orch's memory model for the job (what summary.json compares the measurement with)."""

    peak_allocated: int
    """Predicted per-GPU peak allocated during training."""
    load_peak: int
    """Predicted per-GPU peak during model load and engine init."""


def predict(job: JobSpec, strategy: str) -> Prediction:
    from orchestrator.memory import estimate

    est = estimate(job, strategy)
    return Prediction(peak_allocated=est.peak_allocated, load_peak=est.load_peak)


# ---------------------------------------------------------------------------
# the summary


@dataclass(frozen=True)
class RunSummary:
    """summary.json: the run's outcome, measured peaks against orch's prediction. Field names are the
    file's keys (benchmarks and tests read them)."""

    job: str
    strategy: str
    world_size: int
    steps: int
    """Optimizer steps done."""
    engine: str
    """'deepspeed' or 'plain' (training.engine as resolved)."""
    compiled_variants: Optional[int]
    """Compiled graphs of the decoder layers after the first step (None: training.compile off)."""
    attention: str
    """The attention kernel the model ran (modeling.LoadedModel.attention)."""
    final_loss: Optional[float]
    """Loss of the last logged step (None when this process trained no step)."""
    tokens_per_s: Optional[float]
    """Loss tokens per second over the last log window."""
    device: str
    """'cuda' or 'cpu'."""
    load_peak_bytes: Optional[int]
    """Max over ranks of the measured load peak (None on CPU)."""
    peak_allocated_bytes: Optional[int]
    """Max over ranks of the measured training peak (None on CPU)."""
    cpu_rss_peak_bytes: Optional[int]
    """Max over ranks of the process's peak RSS."""
    load_seconds: float
    """Wall time of the model load/build on rank 0."""
    per_rank: list[RankMemory] = field(default_factory=list)
    predicted_peak_bytes: Optional[int] = None
    predicted_load_peak_bytes: Optional[int] = None
    error_pct: Optional[float] = None
    """(measured - predicted) / predicted training peak, in percent (None on CPU)."""
    mixture: list["SourceShare"] = field(default_factory=list)
    """Per training source: what the steps trained took from it (data.mixture)."""
    evals: dict[str, Any] = field(default_factory=dict)
    """With an eval split: evaluate.Evals.summary (eval_loss, eval_ppl, eval_step, eval_tokens,
    best_eval_loss, best_step, best_checkpoint, early_stopped), top-level keys of summary.json."""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        return {**{k: v for k, v in data.items() if k != "evals"}, **data["evals"]}


def summarize(job: JobSpec, strategy: str, steps: int, engine: str, compiled_variants: Optional[int], attention: str,
              final_loss: Optional[float], tokens_per_s: Optional[float], device: str, load_seconds: float,
              per_rank: list[RankMemory], prediction: Prediction, mixture: list["SourceShare"],
              evals: Optional[dict[str, Any]] = None) -> RunSummary:
    """The summary of a run from what was measured on every rank and orch's prediction."""

    def top(key: str) -> Optional[int]:
        values = [getattr(r, key) for r in per_rank if getattr(r, key) is not None]
        return max(values) if values else None

    peak = top("peak_allocated")
    error = None
    if peak is not None and prediction.peak_allocated:
        error = round(100.0 * (peak - prediction.peak_allocated) / prediction.peak_allocated, 2)
    return RunSummary(
        job=job.name, strategy=strategy, world_size=len(per_rank), steps=steps, engine=engine,
        compiled_variants=compiled_variants, attention=attention, final_loss=final_loss, tokens_per_s=tokens_per_s, device=device,
        load_peak_bytes=top("load_peak_allocated"), peak_allocated_bytes=peak, cpu_rss_peak_bytes=top("cpu_rss_peak"),
        load_seconds=round(load_seconds, 3), per_rank=per_rank, predicted_peak_bytes=prediction.peak_allocated,
        predicted_load_peak_bytes=prediction.load_peak, error_pct=error, mixture=mixture, evals=evals or {})


def write_run_info(job: JobSpec, strategy: str, out: Path, world_size: int, total_steps: int, start_step: int) -> None:
    """``<output_dir>/run.json`` (progress.RunInfo, what `orch status` reads) as training starts or resumes."""
    import time

    from orchestrator.memory import estimate
    from orchestrator.progress import RunInfo

    est = estimate(job, strategy)
    RunInfo(job.name, strategy, world_size, total_steps, start_step, time.time(), est.peak_allocated,
            est.eval_peak).write(out)


def _gib(n: Optional[int], missing: str = "n/a") -> str:
    return missing if n is None else f"{n / GIB:.3f} GiB"


def render_summary(s: RunSummary) -> str:
    """The lines printed at the end of a run."""
    return "\n".join([
        f"orch: {s.job}: {s.steps} steps, final loss {s.final_loss}, {s.strategy} on {s.world_size} x {s.device}",
        f"  peak allocated: measured {_gib(s.peak_allocated_bytes)}, predicted {_gib(s.predicted_peak_bytes)}, "
        f"error {s.error_pct if s.error_pct is not None else 'n/a'} %",
        f"  load peak: measured {_gib(s.load_peak_bytes)}, predicted {_gib(s.predicted_load_peak_bytes)}; "
        f"CPU RSS peak {_gib(s.cpu_rss_peak_bytes)}",
    ] + ([_eval_line(s.evals)] if s.evals.get("eval_loss") is not None else []))


def _eval_line(e: dict[str, Any]) -> str:
    return (f"  eval loss {e['eval_loss']:.4f} (step {e['eval_step']}), best {e['best_eval_loss']:.4f} at step "
            f"{e['best_step']}" + (f" ({e['best_checkpoint']})" if e.get("best_checkpoint") else "")
            + (", stopped early" if e.get("early_stopped") else ""))


def write_summary(path: Path, s: RunSummary) -> None:
    path.write_text(json.dumps(s.to_json(), indent=2) + "\n")


def oom_message(job: JobSpec, strategy: str, rank: int, step: int, used: Optional[int]) -> str:
    """One line for a CUDA out-of-memory in optimizer step ``step`` (1-based) on ``rank``: orch's
    predicted peak, the memory used (``used``, torch's max allocated; None on the CPU) and the
    strategy to try next."""
    from orchestrator.planner import next_strategy

    predicted = predict(job, strategy).peak_allocated
    nxt = next_strategy(job, strategy)
    gib = lambda b: "unknown" if b is None else f"{b / GIB:.2f} GiB"  # noqa: E731
    return (f"out of GPU memory on rank {rank} in step {step} with strategy {strategy}: "
            f"predicted peak {gib(predicted)}, used {gib(used)} (max allocated); "
            + (f"try strategy={nxt} (orch plan shows the options)" if nxt else "no larger-saving strategy left: "
               "lower training.micro_batch_size or data.seq_len, or add GPUs"))


# ---------------------------------------------------------------------------
# metrics.jsonl and wandb


class MetricsLog:
    """Where each rank's StepRecords go: ``metrics.jsonl`` (every rank appends its own lines) and, on
    rank 0, the wandb run (None when wandb is off, not installed, or has failed).

    Logging never stops training: a wandb call that fails (its service process can die first when
    Slurm signals every process of the job, and then every call raises ConnectionResetError) turns
    wandb off for the rest of the run with one warning line; metrics.jsonl keeps every record."""

    def __init__(self, path: Path, wandb_run: Any = None):
        self.path = path
        """<output_dir>/metrics.jsonl."""
        self.wandb_run = wandb_run
        """The wandb run on rank 0, or None."""

    def log(self, record: StepRecord) -> None:
        row = asdict(record)
        with open(self.path, "a") as f:  # one short line per write: appends from ranks do not interleave
            f.write(json.dumps(row) + "\n")
        flat = {k: v for k, v in row.items() if k not in ("rank", "time", "source_tokens") and v is not None}
        flat.update({f"source_tokens/{name}": tokens for name, tokens in record.source_tokens.items()})
        self._wandb(f"log of step {record.step}", lambda run: run.log(flat, step=record.step))

    def log_eval(self, step: int, rank: int, loss: float, perplexity: float, tokens: int) -> None:
        """One eval (rank 0): a metrics.jsonl line with eval_loss (what `orch status` reads) and wandb."""
        import time

        row = {"step": step, "rank": rank, "eval_loss": loss, "eval_ppl": perplexity, "eval_tokens": tokens,
               "time": time.time()}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self._wandb(f"eval of step {step}", lambda run: run.log({"eval_loss": loss, "eval_ppl": perplexity}, step=step))

    def finish(self, summary: RunSummary) -> None:
        """Put the summary into the wandb run and close it."""
        data = summary.to_json()

        def put(run) -> None:
            run.summary.update({k: v for k, v in data.items() if k not in ("per_rank", "mixture")})
            for share in data["mixture"]:
                run.summary.update({f"mixture/{share['name']}/{k}": v for k, v in share.items() if k != "name"})
            for r in data["per_rank"]:
                run.summary.update({f"rank{r['rank']}/{k}": v for k, v in r.items() if k != "rank"})
            run.finish()

        self._wandb("summary", put)
        self.wandb_run = None

    def _wandb(self, what: str, call: Callable[[Any], None]) -> None:
        if self.wandb_run is None:
            return
        try:
            call(self.wandb_run)
        except Exception as exc:  # noqa: BLE001 - whatever wandb raises, training goes on
            first = next(iter(str(exc).splitlines()), "")
            print(f"orch: warning: wandb {what} failed ({type(exc).__name__}: {first}); logging to "
                  f"{self.path.name} only from now on", file=sys.stderr, flush=True)
            self.wandb_run = None
            _close_wandb()


def _close_wandb() -> None:
    """Let go of a failed wandb: its teardown unregisters the exit hook that would otherwise print a
    traceback when the process ends (and fails in turn when the service is gone)."""
    import wandb

    try:
        wandb.teardown()
    except Exception:  # noqa: BLE001 - the service is gone; the hook is unregistered before this raises
        pass


def setup_logging(job: JobSpec, strategy: str, out: Path, is_main: bool, world_size: int, resume: bool) -> MetricsLog:
    """The run's MetricsLog; rank 0 also starts the wandb run of ``out`` (continues it when
    ``resume``) when logging.wandb_mode is not disabled."""
    log = MetricsLog(out / "metrics.jsonl")
    mode = job.logging.wandb_mode
    if not is_main or mode == "disabled":
        return log
    if mode == "online" and not os.environ.get("WANDB_API_KEY"):
        print("orch: logging.wandb_mode is online but WANDB_API_KEY is not set; logging offline", file=sys.stderr)
        mode = "offline"
    try:
        import wandb
    except ImportError:
        # wandb is optional at run time (the GPU image has none): metrics.jsonl still gets everything.
        print(f"orch: logging.wandb_mode is {mode} but wandb is not installed; logging to metrics.jsonl only",
              file=sys.stderr)
        return log
    os.environ["WANDB_MODE"] = mode
    os.environ.setdefault("WANDB_SILENT", "true")
    # one wandb run per run of the output dir: a resumed (requeued) job continues it, a new start makes its own
    id_file = out / "wandb_run_id"
    run_id = id_file.read_text().strip() if resume and id_file.is_file() else secrets.token_hex(4)
    id_file.write_text(run_id)
    try:
        log.wandb_run = wandb.init(
            id=run_id, project=job.logging.wandb_project, entity=job.logging.wandb_entity, name=job.name,
            dir=str(out), config={"job": job.model_dump(mode="json"), "strategy": strategy, "world_size": world_size},
            resume="allow")
    except Exception as exc:  # noqa: BLE001 - as for any wandb call: logging never stops training
        first = next(iter(str(exc).splitlines()), "")
        print(f"orch: warning: wandb could not start ({type(exc).__name__}: {first}); logging to metrics.jsonl only",
              file=sys.stderr)
        _close_wandb()
    return log


# ---------------------------------------------------------------------------
# memory plot


@dataclass(frozen=True)
class PlotLine:
    """One line of memory.png."""

    label: str
    steps: tuple[int, ...]
    """x values (optimizer steps); empty for a horizontal line across the plot."""
    gib: tuple[float, ...]
    """y values in GiB (one value for a horizontal line)."""
    style: str = "-"


@dataclass(frozen=True)
class MemoryPlot:
    """What memory.png shows (`memory_plot`)."""

    lines: list[PlotLine]
    ylabel: str
    title: str


def memory_plot(records: list[dict], summary: RunSummary) -> MemoryPlot:
    """Like with like: on a GPU each rank's allocated, peak and reserved GPU memory with orch's
    predicted peak; on the CPU each rank's process RSS alone (the prediction is of GPU memory, which a
    CPU run does not use, so it is not drawn)."""
    runs: dict[int, list[dict]] = {}
    for rec in records:
        runs.setdefault(rec["rank"], []).append(rec)
    on_gpu = any(r.get("mem_allocated") is not None for r in records)
    lines = []
    for rank, recs in sorted(runs.items()):
        steps = tuple(r["step"] for r in recs)
        if on_gpu:
            for key, name, style in (("mem_allocated", "allocated", "-"), ("mem_peak", "peak", "--"),
                                     ("mem_reserved", "reserved", ":")):
                lines.append(PlotLine(f"rank {rank} {name}", steps, tuple(r[key] / GIB for r in recs), style))
        else:
            lines.append(PlotLine(f"rank {rank} process RSS", steps, tuple(r["cpu_rss"] / GIB for r in recs)))
    where = f"{summary.strategy}, {summary.world_size} ranks"
    if not on_gpu:
        return MemoryPlot(lines, "GiB of host memory (process RSS)", f"{summary.job} ({where}; CPU run: no GPU memory)")
    if summary.predicted_peak_bytes:
        lines.append(PlotLine("predicted peak (orch plan)", (), (summary.predicted_peak_bytes / GIB,), "-"))
    return MemoryPlot(lines, "GiB of GPU memory (torch allocator)", f"{summary.job} ({where})")


def plot_memory(metrics: Path, png: Path, summary: RunSummary) -> None:
    """Draw `memory_plot` of ``metrics`` (metrics.jsonl) into ``png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    plot = memory_plot([r for r in records if "eval_loss" not in r], summary)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for line in plot.lines:
        if line.steps:
            ax.plot(line.steps, line.gib, line.style, label=line.label)
        else:
            ax.axhline(line.gib[0], color="red", linestyle=line.style, label=line.label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(plot.ylabel)
    ax.set_title(plot.title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
