"""Auto knobs, validated: the planner's micro batch and checkpointing against a measured grid (issue 16).

    PYTHONPATH=$PWD python benchmarks/knob_grid.py --list                 # jobs, grids, the planner's choice
    PYTHONPATH=$PWD python benchmarks/knob_grid.py --job qlora-8b-24gb    # GPU machine: one job's grid
    PYTHONPATH=$PWD python benchmarks/knob_grid.py --tiny                 # CPU smoke test (tiny-llama)

For one job with ``training.micro_batch_size: auto`` and ``training.gradient_checkpointing: auto``, every
micro batch that keeps the global batch (planner.micro_batch_choices) x checkpointing on/off is run with
orch's trainer pieces in ONE process (benchmarks/inprocess.py): the model is built, capped to the planned
GPU and compiled once; per point checkpointing is switched, a fresh engine and optimizer are made, the peak
counters reset and ``--steps`` optimizer steps run; an out-of-memory ends only that point. tokens/s counts
processed tokens (global batch x seq_len per step, padding included) over the steps after ``--warmup``
(throughput.steady_tokens_per_s: the first point's warm-up includes compiling the layers, later ones their
recompile for the new shapes).

Order: the planner's choice first (so it is measured whatever happens later), then micro batch 1 with
checkpointing (the hand-set default the 24 GiB job is compared with), then the rest from small to large per
checkpointing setting; once a micro batch runs out of memory, the larger ones of that setting are skipped
(memory only grows with the micro batch) and recorded as such.

A job passes when the choice ran without running out of memory and reached at least WITHIN of the fastest
point that ran; the 24 GiB job also needs at least HAND_SET_GAIN x micro batch 1 with checkpointing.

Results: one JSON + markdown per run (``--out``, default benchmarks/results/knob_grid.json); a timeout of the
device call keeps the points written so far (the file is rewritten after each point). Nothing in this file is
a measurement: run it on the GPU machine (benchmarks/device/knob_grid.sh).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, select_named, versions, write_data  # noqa: E402
from benchmarks.throughput import steady_tokens_per_s  # noqa: E402
from orchestrator import levers, memory, planner  # noqa: E402
from orchestrator.catalog import GIB  # noqa: E402
from orchestrator.spec import JobSpec, load_job  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
RUNS = ROOT / "runs" / "knob_grid"
WITHIN = 0.90
"""The choice passes at this fraction of the fastest measured point or more (issue 16: within 10 %)."""
HAND_SET_GAIN = 1.5
"""The 24 GiB job's choice must reach this multiple of micro batch 1 with checkpointing (issue 16)."""
AUTO = ("training.micro_batch_size=auto", "training.gradient_checkpointing=auto")


@dataclass(frozen=True)
class GridJob:
    """One job whose knobs are left to the planner."""

    name: str
    """Short unique name (--job)."""
    file: str
    """The job file (repo-relative); its data is replaced by synthetic packed text."""
    overrides: tuple[str, ...]
    """Spec overrides on it (knobs auto are added)."""
    hand_set_gain: Optional[float] = None
    """When set: the choice must reach this multiple of micro batch 1 with checkpointing."""
    cpu: bool = False
    """The CPU smoke job."""

    def spec(self, data_path: Path, out: Path, steps: int) -> JobSpec:
        """The job with its knobs auto, on ``data_path`` (text rows), writing nothing but into ``out``."""
        return load_job(ROOT / self.file, [*self.overrides, *AUTO, f"data.paths=[{data_path}]", "data.format=text",
                                           f"training.max_steps={steps}", "training.save_every=0",
                                           f"training.output_dir={out}", "logging.wandb_mode=disabled"],
                        check_paths=False)


JOBS: list[GridJob] = [
    # the example job, planned for 24 GiB: on an H100 the allocator is capped to it (orchestrator/memory_cap.py)
    GridJob("qlora-8b-24gb", "jobs/llama8b_qlora_24gb.yaml", ("hardware.gpu=H100-80GB", "hardware.gpu_memory_gb=24"),
            hand_set_gain=HAND_SET_GAIN),
    GridJob("qlora-1b", "jobs/llama8b_qlora_24gb.yaml", ("model.name=llama3-1b", "hardware.gpu=H100-80GB")),
    GridJob("qlora-70b", "jobs/llama8b_qlora_24gb.yaml", ("model.name=llama3-70b", "hardware.gpu=H100-80GB",
                                                           "data.seq_len=1024", "training.global_batch_size=8")),
    GridJob("lora-8b", "jobs/llama8b_qlora_24gb.yaml", ("method=lora", "hardware.gpu=H100-80GB")),
]
TINY_JOBS: list[GridJob] = [
    GridJob("tiny-qlora-cpu", "jobs/tiny.yaml", ("training.global_batch_size=4", "hardware.gpu_memory_gb=4"), cpu=True),
]


def grid_job(name: str) -> GridJob:
    return next(j for j in JOBS + TINY_JOBS if j.name == name)


def point_job(job_name: str, micro_batch_size: int, gradient_checkpointing: bool, steps: int = 3) -> JobSpec:
    """The job of one measured point (for re-fitting the speed model on stored results: speed_fit.py)."""
    spec = grid_job(job_name).spec(Path("/tmp/unused.jsonl"), Path("/tmp/unused"), steps)
    return planner.with_knobs(spec, micro_batch_size, gradient_checkpointing)


# ---------------------------------------------------------------------------
# The grid


@dataclass(frozen=True)
class Point:
    micro_batch_size: int
    gradient_checkpointing: bool


def planned_choice(job: JobSpec) -> tuple[str, Point]:
    """(strategy, knobs) the planner resolves for ``job``."""
    strategy, resolved = planner.resolve(job)
    return strategy, Point(resolved.training.micro_batch_size, bool(resolved.training.gradient_checkpointing))


def grid(job: JobSpec, choice: Point, everything: bool = False) -> list[Point]:
    """The points to run, in order: the choice, micro batch 1 with checkpointing, then the rest ascending by
    micro batch, checkpointing on before off. Unless ``everything``, per checkpointing setting the points
    the planner says fit and the first one it says does not (its boundary, checked): the larger ones
    would only cost device time to run out of memory (a measured out-of-memory skips them anyway)."""
    points = []
    for ckpt in planner.checkpointing_choices(job)[::-1]:
        for m in planner.micro_batch_choices(job):
            points.append(Point(m, ckpt))
            if not everything and not predicted(job, Point(m, ckpt))["predicted_fits"]:
                break
    first = [choice, Point(1, True)]
    return list(dict.fromkeys(first + sorted(points, key=lambda p: (not p.gradient_checkpointing, p.micro_batch_size))))


def parse_points(text: str) -> list[Point]:
    """--points 8:on,1:on,2:off -> those points, in that order."""
    out = []
    for item in text.split(","):
        micro, _, ckpt = item.partition(":")
        if not micro.isdigit() or ckpt not in ("on", "off"):
            raise ValueError(f"--points: {item!r} is not MICRO:on or MICRO:off")
        out.append(Point(int(micro), ckpt == "on"))
    return out


def predicted(job: JobSpec, point: Point) -> dict:
    """The planner's view of one point: peak, total, fit and tokens/s."""
    j = planner.with_knobs(job, point.micro_batch_size, point.gradient_checkpointing)
    c = planner.evaluate(j, "single_gpu", j.shape())
    return {"predicted_peak_bytes": c.estimate.peak_allocated, "predicted_total_bytes": c.estimate.total,
            "predicted_fits": c.fits, "predicted_tokens_per_s": round(c.tokens_per_s, 1)}


def measure(model, job: JobSpec, point: Point, steps: int, warmup: int,
            step_fn: Optional[Callable] = None) -> dict:
    """Run one point on the built model: its checkpointing, a fresh engine, ``steps`` optimizer steps."""
    import torch

    from benchmarks import inprocess as P
    from orchestrator import data as D
    from orchestrator import speedups as S

    step_fn = step_fn or P.optimizer_step
    j = planner.with_knobs(job, point.micro_batch_size, point.gradient_checkpointing)
    cuda = model.device.type == "cuda"
    out: dict = {"micro_batch_size": point.micro_batch_size, "gradient_checkpointing": point.gradient_checkpointing,
                 "engine": model.levers.engine, "attention": model.loaded.attention, "compiled_variants": None,
                 **predicted(job, point)}
    eng = None
    try:
        P.set_checkpointing(model, point.gradient_checkpointing)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        eng = P.engine(model, j)
        batcher = D.Batcher(model.rows, j.training.seed, point.micro_batch_size, j.grad_accum(), 1)
        if cuda:
            out["engine_init_peak_bytes"] = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        eng.train()
        times, start = [], time.time()
        for step in range(steps):
            step_fn(model, eng, batcher, step)
            P.synchronize(model.device)
            times.append(time.time())
        if model.compiled is not None:
            out["compiled_variants"] = S.check_compiled(model.compiled)
        tokens = j.training.global_batch_size * j.data.seq_len
        out.update(steps=steps, seconds=round(times[-1] - start, 2), step_times=[round(b - a, 4) for a, b in
                                                                                 zip([start] + times, times)],
                   tokens_per_s=steady_tokens_per_s(times, warmup, tokens), oom=False,
                   peak_allocated_bytes=torch.cuda.max_memory_allocated() if cuda else None)
    except torch.cuda.OutOfMemoryError:
        out.update(tokens_per_s=None, oom=True,
                   peak_allocated_bytes=torch.cuda.max_memory_allocated() if cuda else None)
    finally:
        del eng
        P.release(model)
    return out


def verdict(choice: Point, points: list[dict], hand_set_gain: Optional[float]) -> dict:
    """Does the choice run, and is it within WITHIN of the fastest point that ran (and, where asked, at
    least hand_set_gain x micro batch 1 with checkpointing)?"""
    def find(p: Point) -> Optional[dict]:
        return next((r for r in points if (r["micro_batch_size"], r["gradient_checkpointing"]) ==
                     (p.micro_batch_size, p.gradient_checkpointing)), None)

    ran = [r for r in points if r.get("tokens_per_s")]
    mine = find(choice)
    best = max(ran, key=lambda r: r["tokens_per_s"]) if ran else None
    out: dict = {"choice_ran": bool(mine and mine.get("tokens_per_s")),
                 "fastest": None if best is None else {k: best[k] for k in ("micro_batch_size", "gradient_checkpointing",
                                                                            "tokens_per_s")}}
    if out["choice_ran"] and best is not None:
        out["choice_over_fastest"] = round(mine["tokens_per_s"] / best["tokens_per_s"], 3)
    checks = [out["choice_ran"], out.get("choice_over_fastest", 0) >= WITHIN]
    if hand_set_gain is not None:
        hand = find(Point(1, True))
        if out["choice_ran"] and hand and hand.get("tokens_per_s"):
            out["choice_over_hand_set"] = round(mine["tokens_per_s"] / hand["tokens_per_s"], 3)
        checks.append(out.get("choice_over_hand_set", 0) >= hand_set_gain)
    out["passed"] = all(checks)
    return out


def run_job(g: GridJob, steps: int, warmup: int, out: Path, meta: dict, points: Optional[list[Point]] = None,
            everything: bool = False, step_fn: Optional[Callable] = None) -> dict:
    """Measure one job's grid (or ``points``) in this process and write ``out`` (+ .md) after every point."""
    from benchmarks import inprocess as P

    run_dir = RUNS / g.name
    run_dir.mkdir(parents=True, exist_ok=True)
    data = run_dir / "data.jsonl"
    job = g.spec(data, run_dir / "out", steps)
    strategy, choice = planned_choice(job)
    points = points or grid(job, choice, everything)
    largest = planner.with_knobs(job, max(p.micro_batch_size for p in points), False)
    write_data(data, largest)  # enough rows for the largest global batch's steps
    dev = P.device()
    row: dict = {"job": g.name, "file": g.file, "overrides": list(g.overrides), "strategy": strategy,
                 "choice": {"micro_batch_size": choice.micro_batch_size,
                            "gradient_checkpointing": choice.gradient_checkpointing},
                 "global_batch_size": job.training.global_batch_size, "seq_len": job.data.seq_len,
                 "levers": vars(levers.resolve(job, strategy, job.shape(), cuda=dev.type == "cuda")), "points": []}
    if strategy != "single_gpu":
        row["skipped"] = f"the planner chose {strategy}; this harness measures single_gpu only"
        save([row], meta, out)
        return row
    # grid points compile their own shapes: one graph per (micro batch, checkpointing), none shared
    import torch

    torch._dynamo.config.automatic_dynamic_shapes = False
    model = P.build(planner.with_knobs(job, choice.micro_batch_size, choice.gradient_checkpointing), dev,
                    recompile_limit=2 * len(points) + 8)
    row.update(load_seconds=round(model.load_seconds, 1), memory_cap=None if model.cap is None else model.cap.line())
    oom_from: dict[bool, int] = {}
    for p in points:
        limit = oom_from.get(p.gradient_checkpointing)
        if limit is not None and p.micro_batch_size > limit and p != choice:
            row["points"].append({"micro_batch_size": p.micro_batch_size, "gradient_checkpointing": p.gradient_checkpointing,
                                  "skipped": f"micro batch {limit} ran out of memory", **predicted(job, p)})
            continue
        print(f"  {g.name}: micro batch {p.micro_batch_size}, checkpointing {'on' if p.gradient_checkpointing else 'off'}",
              flush=True)
        r = measure(model, job, p, steps, warmup, step_fn)
        row["points"].append(r)
        if r["oom"]:
            oom_from[p.gradient_checkpointing] = min(p.micro_batch_size, oom_from.get(p.gradient_checkpointing, p.micro_batch_size))
        row["verdict"] = verdict(choice, row["points"], g.hand_set_gain)
        save([row], meta, out)
    return row


# ---------------------------------------------------------------------------
# Reporting


def _gib(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def markdown(rows: list[dict], meta: dict) -> str:
    out = [f"# Auto knobs vs a measured grid ({meta.get('date', '')}, {meta.get('device', '')})", ""]
    for r in rows:
        c = r["choice"]
        out += [f"## {r['job']}: {r['strategy']}, global batch {r['global_batch_size']} x {r['seq_len']} tokens", "",
                f"Choice: micro batch {c['micro_batch_size']}, checkpointing {'on' if c['gradient_checkpointing'] else 'off'}; "
                f"levers {r['levers']}." + (f" {r['memory_cap']}." if r.get("memory_cap") else ""), ""]
        if r.get("skipped"):
            out += [f"Skipped: {r['skipped']}", ""]
            continue
        out += ["| micro batch | checkpointing | tok/s | predicted tok/s | peak GiB | predicted peak GiB | "
                "predicted fits | note |", "|---:|---|---:|---:|---:|---:|---|---|"]
        for p in r["points"]:
            mark = " (choice)" if (p["micro_batch_size"], p["gradient_checkpointing"]) == \
                (c["micro_batch_size"], c["gradient_checkpointing"]) else ""
            note = p.get("skipped") or ("out of memory" if p.get("oom") else "")
            tps = "-" if not p.get("tokens_per_s") else f"{p['tokens_per_s']:.0f}"
            out.append(f"| {p['micro_batch_size']}{mark} | {'on' if p['gradient_checkpointing'] else 'off'} | {tps} | "
                       f"{p['predicted_tokens_per_s']:.0f} | {_gib(p.get('peak_allocated_bytes'))} | "
                       f"{_gib(p['predicted_peak_bytes'])} | {'yes' if p['predicted_fits'] else 'no'} | {note} |")
        v = r.get("verdict", {})
        out += ["", f"Verdict: {json.dumps(v)}", ""]
    out.append(f"Within: {WITHIN} of the fastest point that ran; steps {meta.get('steps')}, warm-up {meta.get('warmup')}. "
               "Versions: " + ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items()))
    return "\n".join(out) + "\n"


def save(rows: list[dict], meta: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(rows, meta))


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--job", help="the job to measure (one per process: --list shows them)")
    ap.add_argument("--list", action="store_true", help="jobs, their grids and the planner's choice; runs nothing")
    ap.add_argument("--tiny", action="store_true", help="the CPU smoke job (tiny-llama) instead of the GPU ones")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per point")
    ap.add_argument("--warmup", type=int, default=1, help="first steps of a point left out of tokens/s (>= 1)")
    ap.add_argument("--out", default=None, help="JSON file (default benchmarks/results/knob_grid[_tiny].json; .md next to it)")
    ap.add_argument("--points", help="only these points, in this order: MICRO:on|off,... (default: the grid, see --all)")
    ap.add_argument("--all", action="store_true", help="every micro batch x checkpointing, also past the first one the "
                    "planner says does not fit")
    args = ap.parse_args(argv)
    if not 1 <= args.warmup < args.steps:
        ap.error("--warmup must be at least 1 and less than --steps")
    jobs = select_named(TINY_JOBS if args.tiny else JOBS, args.job, "job", "" if args.tiny else " (and --tiny)")
    if jobs is None:
        return 2
    if args.list:
        for g in jobs:
            job = g.spec(Path("/tmp/unused.jsonl"), Path("/tmp/unused"), args.steps)
            strategy, choice = planned_choice(job)
            print(f"{g.name}: {strategy}, choice micro batch {choice.micro_batch_size}, checkpointing "
                  f"{'on' if choice.gradient_checkpointing else 'off'}")
            for p in grid(job, choice, args.all):
                pred = predicted(job, p)
                print(f"  mb {p.micro_batch_size:>3} ckpt {'on ' if p.gradient_checkpointing else 'off'} "
                      f"{pred['predicted_tokens_per_s']:>9.0f} tok/s  {pred['predicted_total_bytes'] / GIB:6.1f} GiB "
                      f"{'fits' if pred['predicted_fits'] else 'does not fit'}")
        return 0
    if not args.tiny and not args.job:
        ap.error("--job: one job per process (each builds its model once); --list shows them")
    out = Path(args.out) if args.out else RESULTS / ("knob_grid_tiny.json" if args.tiny else "knob_grid.json")
    device, gpus = machine()
    meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "device": device,
            "versions": versions(), "steps": args.steps, "warmup": args.warmup}
    try:
        points = parse_points(args.points) if args.points else None
    except ValueError as exc:
        ap.error(str(exc))
    rows = []
    for g in jobs:
        print(f"running {g.name} ...", flush=True)
        rows.append(run_job(g, args.steps, args.warmup, out, meta, points, args.all))
        print(f"  verdict: {json.dumps(rows[-1].get('verdict'))}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
