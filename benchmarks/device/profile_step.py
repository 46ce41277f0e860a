"""Where one optimizer step's GPU time goes, old path vs orch's new default (issue 16 item 4).

    python3 benchmarks/device/profile_step.py --out DIR            # GPU machine: both paths, one process each
    python3 benchmarks/device/profile_step.py --tiny --out DIR     # CPU smoke run (tiny-llama, CPU op times)

The job: 8B QLoRA (jobs/llama8b_qlora_24gb.yaml on an H100), micro batch 4, global batch 4, seq 2048,
checkpointing on, synthetic packed text. Paths:

* ``old``: DeepSpeed's engine, eager layers, sdpa with the packed rows' dense mask (orch before issue 16);
* ``new``: the defaults (``levers.resolve``: PlainEngine, compiled decoder layers, flex attention on CUDA).

Each path runs in its own process (benchmarks/inprocess.py: the trainer's pieces, the model built once):
WARMUP optimizer steps (compiling the layers on the new path), then one step under ``torch.profiler``. The
kernels' self time is summed per category (``category``: kernel names matched in order, first match wins);
"triton_tem" kernels count as attention: Inductor's templates in orch's default compile mode (no
max-autotune) are only flex attention's. Writes DIR/profile_step.json and DIR/profile_step.md.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import versions, write_data  # noqa: E402
from orchestrator.spec import JobSpec, load_job  # noqa: E402

PATHS = {"old": ("training.engine=deepspeed", "training.compile=false", "model.attn_implementation=sdpa"),
         "new": ()}
"""Overrides per path; the new path is the defaults."""
JOB = ("jobs/llama8b_qlora_24gb.yaml", ("hardware.gpu=H100-80GB", "training.micro_batch_size=4",
                                        "training.global_batch_size=4", "training.gradient_checkpointing=true"))
TINY_JOB = ("jobs/tiny.yaml", ("training.micro_batch_size=2", "training.global_batch_size=4",
                               "training.gradient_checkpointing=true"))
WARMUP = 2
"""Optimizer steps before the profiled one (the first compiles the new path's layers)."""

CATEGORIES = (
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("dequantize", r"dequant"),
    ("attention", r"flash|fmha|attention|flex|sdpa|triton_tem"),
    ("gemm", r"gemm|cutlass|xmma|nvjet|cublas|aten::(mm|addmm|bmm|matmul|linear)\b"),
    ("elementwise/norm", r"elementwise|vectorized|reduce|norm|softmax|triton_poi|triton_red|triton_per|"
                         r"aten::(add|mul|sub|div|silu|rsqrt|pow|mean|neg|cat|copy_|clone|to|_to_copy|fill_)"),
)
"""(category, regex on the lower-cased kernel/op name), tried in order; no match: "other"."""


def category(name: str) -> str:
    low = name.lower()
    return next((c for c, rx in CATEGORIES if re.search(rx, low)), "other")


def job_for(path: str, tiny: bool, data: Path, out: Path) -> JobSpec:
    file, overrides = TINY_JOB if tiny else JOB
    return load_job(ROOT / file, [*overrides, *PATHS[path], f"data.paths=[{data}]", "data.format=text",
                                  f"training.max_steps={WARMUP + 1}", "training.save_every=0",
                                  f"training.output_dir={out}", "logging.wandb_mode=disabled"], check_paths=False)


def profile_path(path: str, tiny: bool, work: Path) -> dict:
    """Build ``path``'s model, run WARMUP steps, profile one: time per category (this process)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from benchmarks import inprocess as P
    from orchestrator import data as D

    work.mkdir(parents=True, exist_ok=True)
    data = work / "data.jsonl"
    job = job_for(path, tiny, data, work / "out")
    write_data(data, job)
    dev = P.device()
    model = P.build(job, dev)
    eng = P.engine(model, job)
    batcher = D.Batcher(model.rows, job.training.seed, job.training.micro_batch_size, job.grad_accum(), 1)
    eng.train()
    for step in range(WARMUP):
        P.optimizer_step(model, eng, batcher, step)
    P.synchronize(dev)
    cuda = dev.type == "cuda"
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    start = time.time()
    with profile(activities=activities) as prof:
        P.optimizer_step(model, eng, batcher, WARMUP)
        P.synchronize(dev)
    step_seconds = time.time() - start
    want = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    per: dict[str, float] = {}
    top: list[tuple[float, str]] = []
    for e in prof.key_averages():
        if e.device_type != want:
            continue
        us = e.self_device_time_total if cuda else e.self_cpu_time_total
        if us <= 0:
            continue
        per[category(e.key)] = per.get(category(e.key), 0.0) + us
        top.append((us, e.key))
    total = sum(per.values())
    return {"path": path, "engine": model.levers.engine, "compiled": model.compiled is not None,
            "attention": model.loaded.attention, "step_seconds": round(step_seconds, 3),
            "timed": "CUDA kernel self time" if cuda else "CPU op self time (smoke run)",
            "total_ms": round(total / 1e3, 2),
            "ms": {c: round(per.get(c, 0.0) / 1e3, 2) for c, _ in CATEGORIES + (("other", ""),)},
            "top": [{"name": n[:120], "ms": round(us / 1e3, 2), "category": category(n)}
                    for us, n in sorted(top, reverse=True)[:15]]}


def markdown(rows: list[dict], meta: dict) -> str:
    cats = [c for c, _ in CATEGORIES] + ["other"]
    lines = [f"# One optimizer step, by kernel category ({meta['device']}, {meta['job']})", "",
             "| path | engine | layers | attention | step s | total ms | " + " | ".join(cats) + " |",
             "|---" * (6 + len(cats)) + "|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['path']} | failed: {r['error']} |" + " |" * (4 + len(cats)))
            continue
        share = lambda c: f"{r['ms'][c]:.1f} ({100 * r['ms'][c] / r['total_ms']:.0f} %)" if r["total_ms"] else "-"  # noqa: E731
        lines.append(f"| {r['path']} | {r['engine']} | {'compiled' if r['compiled'] else 'eager'} | {r['attention']} | "
                     f"{r['step_seconds']:.2f} | {r['total_ms']:.1f} | " + " | ".join(share(c) for c in cats) + " |")
    lines += ["", f"Times: {rows[0].get('timed', '-')}, summed per category (benchmarks/device/profile_step.py).", ""]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for profile_step.json and .md")
    ap.add_argument("--tiny", action="store_true", help="tiny-llama on the CPU (smoke run)")
    ap.add_argument("--path", choices=sorted(PATHS), help=argparse.SUPPRESS)  # the worker: one path, this process
    ap.add_argument("--timeout", type=int, default=240, help="seconds per path")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = ROOT / "runs" / "profile_step"
    if args.path:
        result = profile_path(args.path, args.tiny, work / args.path)
        (out / f"profile_{args.path}.json").write_text(json.dumps(result, indent=1) + "\n")
        return 0
    from benchmarks.common import child_env, machine

    device, _ = machine()
    meta = {"device": device, "versions": versions(), "warmup_steps": WARMUP,
            "job": " ".join(TINY_JOB[1] if args.tiny else (JOB[0], *JOB[1]))}
    rows = []
    for path in PATHS:  # old first: each in a fresh process, so neither sees the other's allocations or compiled code
        cmd = [sys.executable, str(Path(__file__).resolve()), "--path", path, "--out", str(out)] + \
              (["--tiny"] if args.tiny else [])
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=args.timeout)
            rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-2000:]
        except subprocess.TimeoutExpired:
            rc, tail = 124, "timed out"
        res = out / f"profile_{path}.json"
        rows.append(json.loads(res.read_text()) if rc == 0 and res.exists() else
                    {"path": path, "error": f"rc {rc}", "log_tail": tail})
        (out / "profile_step.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
        (out / "profile_step.md").write_text(markdown(rows, meta))
        print(f"{path}: " + json.dumps({k: rows[-1].get(k) for k in ("step_seconds", "total_ms", "ms", "error")}),
              flush=True)
    print(markdown(rows, meta))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
