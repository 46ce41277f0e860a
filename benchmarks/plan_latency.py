"""Wall time of `orch plan jobs/llama70b.yaml` as a user sees it: a fresh process each time.

    PYTHONPATH=$PWD python benchmarks/plan_latency.py [--runs 10] [--job jobs/llama70b.yaml]

Prints each run and the median, and writes benchmarks/results/plan_latency.json
(machine, date, command, timings). The target is well under 0.5 s: `orch plan`
imports no torch and loads no weights. Exit code 0 (fits) and 3 (nothing fits)
are both valid plan answers; anything else is an error.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 0.5


def in_process_ms(job_path: str) -> float:
    """Time of load_job + plan + render_table alone (imports excluded), median of 20."""
    sys.path.insert(0, str(ROOT))
    from orchestrator import planner
    from orchestrator.spec import load_job

    samples = []
    for _ in range(20):
        start = time.perf_counter()
        job = load_job(ROOT / job_path)
        planner.render_table(job, planner.plan(job))
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def accelerate_estimate(model_dir: str) -> dict:
    """One run of `accelerate estimate-memory` on the same model folder, offline, for comparison.

    accelerate asks the Hub about every model name (verify_on_hub), so with no network it
    fails; the record keeps its exit code, time and last line rather than pretending.
    """
    exe = Path(sys.executable).with_name("accelerate")
    if not exe.exists():
        return {"available": False}
    cmd = [str(exe), "estimate-memory", model_dir, "--library_name", "transformers"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    return {"argv": cmd, "returncode": proc.returncode, "seconds": round(time.perf_counter() - start, 3),
            "last_line": lines[-1] if lines else ""}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--job", default="jobs/llama70b.yaml")
    ap.add_argument("--model-dir", default="models/llama3-70b", help="the job's model folder, for accelerate")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/plan_latency.json"))
    args = ap.parse_args()

    cmd = [sys.executable, "-m", "orchestrator.cli", "plan", args.job]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    load_before = list(os.getloadavg())
    times = []
    print(f"{'run':>4} {'seconds':>8} {'exit':>5}")
    for i in range(args.runs):
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        elapsed = time.perf_counter() - start
        if proc.returncode not in (0, 3):
            print(proc.stderr, file=sys.stderr)
            return 1
        times.append(elapsed)
        print(f"{i + 1:>4} {elapsed:>8.3f} {proc.returncode:>5}")
    median = statistics.median(times)
    print(f"median {median:.3f} s over {args.runs} process starts (min {min(times):.3f}, max {max(times):.3f}); "
          f"target < {TARGET_S} s: {'ok' if median < TARGET_S else 'MISSED'}; load average before {load_before[0]:.2f} "
          f"(shared machine: other work slows process starts)")
    result = {
        "command": "orch plan " + args.job,
        "argv": cmd,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"node": platform.node(), "cpu": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "python": platform.python_version(), "os": platform.platform()},
        "load_average_before": load_before,
        "load_average_after": list(os.getloadavg()),
        "in_process_plan_ms": round(in_process_ms(args.job), 2),
        "runs": args.runs,
        "seconds": [round(t, 4) for t in times],
        "median_s": round(median, 4),
        "target_s": TARGET_S,
        "ok": median < TARGET_S,
        "accelerate_estimate_memory": accelerate_estimate(args.model_dir),
    }
    acc = result["accelerate_estimate_memory"]
    if acc.get("available", True):
        print(f"accelerate estimate-memory {args.model_dir}: exit {acc['returncode']} after {acc['seconds']:.2f} s: "
              f"{acc['last_line'][:160]}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if median < TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
