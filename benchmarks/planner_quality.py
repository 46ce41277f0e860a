"""Planner quality: does `strategy: auto` pick a strategy within 10 % of the fastest one that fits? (issue 7)

    PYTHONPATH=$PWD python benchmarks/planner_quality.py --list         # jobs, feasible strategies, the pick
    PYTHONPATH=$PWD python benchmarks/planner_quality.py                # GPU machine: run every feasible strategy
    PYTHONPATH=$PWD python benchmarks/planner_quality.py --tiny --steps 3   # CPU smoke test (tiny-llama)

For each job, `orch plan` lists the strategies that fit and the one `auto`
picks; every one of them is then run with orch's trainer (forced strategy, same
job otherwise) and timed the way benchmarks/throughput.py times orch's side
(tokens/s from the step end times in metrics.jsonl, warm-up steps left out).
A job passes when the pick's measured tokens/s is at least 90 % of the fastest
measured strategy. The planner's predicted relative speeds are written next to
the measured ones, so its speed model (planner.SpeedModel) can be checked and
recalibrated on them.

Jobs are sized so several strategies fit on the GPUs the machine has; on one GPU
those are single_gpu and the ZeRO-3 offload variants. Results:
benchmarks/results/planner_quality.json (+ .md). Nothing here is a measurement
until it runs on the GPU machine (benchmarks/device/planner_quality.sh).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import add_timing_args, check_timing_args, machine, make_job, prepare_run, select_named, versions  # noqa: E402
from benchmarks.throughput import Case, run_orch  # noqa: E402
from orchestrator import planner  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
RUNS = ROOT / "runs" / "planner_quality"
WITHIN = 0.90
"""The pick passes when its tokens/s is at least this fraction of the fastest measured strategy's."""


@dataclass(frozen=True)
class Job:
    """A job shape; each feasible strategy of it becomes one throughput Case."""

    name: str
    method: str
    micro_batch: int
    model: str = "llama3-8b"
    seq_len: int = 2048
    dtype: str = "bf16"
    cpu: bool = False

    def case(self, strategy: str) -> Case:
        return Case(f"{self.name}--{strategy}", self.method, self.micro_batch, seq_len=self.seq_len,
                    strategy=strategy, model=self.model, dtype=self.dtype, cpu=self.cpu,
                    lora_r=8 if self.cpu else 16)


JOBS: list[Job] = [
    Job("qlora-8b-mb1", "qlora", 1),
    Job("lora-8b-mb1", "lora", 1),
    Job("full-1b-mb2", "full", 2, model="llama3-1b"),
]
TINY_JOBS: list[Job] = [Job("tiny-qlora", "qlora", 2, model="tiny-llama", seq_len=64, dtype="fp32", cpu=True)]


def planned(job: Job, steps: int) -> tuple[Optional[str], dict[str, float]]:
    """(auto's pick, {feasible strategy: predicted tokens/s}) for the job on this benchmark's hardware."""
    cfg = job.case("single_gpu").config(steps)
    spec = make_job(cfg, Path("/tmp/unused"), Path("/tmp/unused.jsonl"), "plannerq")
    result = planner.plan(spec.model_copy(update={"strategy": "auto"}))
    return result.chosen, {c.strategy: c.tokens_per_s for c in result.candidates if c.fits}


def judge(chosen: Optional[str], measured: dict[str, Optional[float]]) -> dict:
    """Fastest measured strategy, the pick's share of its tokens/s, and whether that is >= WITHIN."""
    ok = {s: t for s, t in measured.items() if t}
    if chosen is None or not ok or not measured.get(chosen):
        return {"fastest": max(ok, key=ok.get) if ok else None, "pick_share": None, "pass": None}
    fastest = max(ok, key=ok.get)
    share = measured[chosen] / ok[fastest]
    return {"fastest": fastest, "pick_share": round(share, 3), "pass": share >= WITHIN}


def run_job(job: Job, steps: int, warmup: int, timeout: int) -> dict:
    chosen, predicted = planned(job, steps)
    row: dict = {"job": job.name, "method": job.method, "model": job.model, "micro_batch": job.micro_batch,
                 "seq_len": job.seq_len, "chosen": chosen, "strategies": {}}
    for strategy in predicted:
        case = job.case(strategy)
        run_dir = RUNS / case.name
        _, job_path = prepare_run(case.config(steps), run_dir, name_prefix="plannerq")
        side = run_orch(case, run_dir, job_path, steps, warmup, timeout)
        side["predicted_tokens_per_s"] = round(predicted[strategy], 1)
        row["strategies"][strategy] = side
        print(f"  {strategy:<26} measured {side['tokens_per_s'] or 0:>9.1f} tok/s  "
              f"predicted {predicted[strategy]:>9.1f}", flush=True)
    row.update(judge(chosen, {s: v["tokens_per_s"] for s, v in row["strategies"].items()}))
    return row


def repredict(rows: list[dict], jobs: dict[str, Job], steps: int) -> list[dict]:
    """Stored rows with today's planner: the measurement-time prediction kept as
    ``predicted_tokens_per_s_at_run``, the pick re-made and re-judged."""
    out = []
    for row in rows:
        chosen, predicted = planned(jobs[row["job"]], steps)
        strategies = {}
        for s, side in row["strategies"].items():
            at_run = side.get("predicted_tokens_per_s_at_run", side["predicted_tokens_per_s"])
            strategies[s] = {**side, "predicted_tokens_per_s_at_run": at_run,
                             "predicted_tokens_per_s": round(predicted.get(s, 0.0), 1)}
        new = {**row, "chosen": chosen, "strategies": strategies}
        new.update(judge(chosen, {s: v["tokens_per_s"] for s, v in strategies.items()}))
        out.append(new)
    return out


def markdown(rows: list[dict], meta: dict) -> str:
    out = [f"# Planner quality ({meta['date']}, {meta['device']})", "",
           f"Each feasible strategy run with orch's trainer, {meta['steps']} steps, tokens/s after "
           f"{meta['warmup_steps']} warm-up steps. Pass: auto's pick reaches {WITHIN:.0%} of the fastest.", "",
           "| job | strategy | auto picks | measured tok/s | predicted tok/s | predicted when measured | measured / fastest |",
           "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        best = max((v["tokens_per_s"] or 0 for v in r["strategies"].values()), default=0)
        for s, v in r["strategies"].items():
            t = v["tokens_per_s"]
            share = f"{t / best:.2f}" if t and best else "failed"
            at_run = v.get("predicted_tokens_per_s_at_run", v["predicted_tokens_per_s"])
            out.append(f"| {r['job']} | {s} | {'yes' if s == r['chosen'] else ''} | {t or 0:.0f} | "
                       f"{v['predicted_tokens_per_s']:.0f} | {at_run:.0f} | {share} |")
    out += ["", "| job | auto picks | fastest measured | pick / fastest | pass |", "|---|---|---|---:|---|"]
    out += [f"| {r['job']} | {r['chosen']} | {r['fastest']} | {r['pick_share']} | {r['pass']} |" for r in rows]
    return "\n".join(out) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated job names")
    ap.add_argument("--list", action="store_true", help="list jobs with the planner's feasible strategies and pick")
    ap.add_argument("--tiny", action="store_true", help="the CPU smoke job (tiny-llama, fp32)")
    ap.add_argument("--out", default=None, help="JSON file (default benchmarks/results/planner_quality.json)")
    add_timing_args(ap, steps=10, timeout=600, timeout_help="seconds per run")
    ap.add_argument("--from-results", metavar="FILE",
                    help="no runs: re-predict stored measurements with the current speed model (after calibrating it)")
    args = ap.parse_args(argv)
    check_timing_args(ap, args)
    jobs = select_named(TINY_JOBS if args.tiny else JOBS, args.only, "job")
    if jobs is None:
        return 2
    if args.list:
        for j in jobs:
            chosen, predicted = planned(j, args.steps)
            print(f"{j.name:<14} auto: {chosen:<26} feasible: " +
                  ", ".join(f"{s} ({t:.0f} tok/s)" for s, t in predicted.items()))
        return 0

    out = Path(args.out) if args.out else RESULTS / "planner_quality.json"
    if args.from_results:
        stored = json.loads(Path(args.from_results).read_text())
        rows = repredict(stored["rows"], {j.name: j for j in JOBS + TINY_JOBS}, stored["steps"])
        meta = {k: v for k, v in stored.items() if k != "rows"}
        meta.update(measured_in=args.from_results, repredicted=True)
        out.write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown(rows, meta))
        print(markdown(rows, meta))
        return 0
    device, gpus = machine()
    meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "device": device,
            "gpus_available": gpus, "versions": versions(), "steps": args.steps, "warmup_steps": args.warmup}
    rows = []
    for j in jobs:
        print(f"running {j.name} ...", flush=True)
        rows.append(run_job(j, args.steps, args.warmup, args.timeout))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")  # after every job
        out.with_suffix(".md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
