"""Memory model accuracy: run orch's trainer on GPUs, compare measured peak allocated with predictions.

    PYTHONPATH=$PWD python benchmarks/memory_accuracy.py --list
    PYTHONPATH=$PWD python benchmarks/memory_accuracy.py                      # all configs (GPU machine)
    PYTHONPATH=$PWD python benchmarks/memory_accuracy.py --only qlora-8b-s2048,full-3b-zero2
    PYTHONPATH=$PWD python benchmarks/memory_accuracy.py --from-results benchmarks/results/memory_accuracy.json
    PYTHONPATH=$PWD python benchmarks/memory_accuracy.py --from-results benchmarks/results/memory_accuracy.json --fit

Each config is a list of overrides on benchmarks/common.py's BASE (random-weight preset, a few steps,
synthetic text long enough to fill every row). For each config the harness
writes the resolved job YAML, runs the trainer (plain python on 1 GPU,
orch's launcher, ``python -m orchestrator.launch --nproc-per-node N``, with NCCL_NVLS_ENABLE=0
on more), reads ``<output_dir>/summary.json`` (peak_allocated_bytes: max over
ranks of torch.cuda.max_memory_allocated during training) and compares with

* orch: ``memory.estimate(job, strategy).peak_allocated``;
* DeepSpeed's own model-state estimators (``estimate_zero2_model_states_mem_needs``
  / ``estimate_zero3_...``, the functions behind ``..._all_cold``), fed the total
  parameter count as a user would (they know nothing of LoRA, 4-bit or activations);
* a "params x bytes" rule of thumb: 0.5 B/param (qlora), 2 (lora), 16 (full),
  divided by the GPUs under ZeRO-3.

Configs are marked "calibration" (used to fit Calibration constants) or
"held_out" (only checked). Results: benchmarks/results/memory_accuracy.json
(every measurement, so predictions can be re-rendered on a CPU after
re-calibration with --from-results) and memory_accuracy.md (the table).
Target: median |error| <= 5 %, worst <= 12 %.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import statistics
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    Config, child_env, job_as_ran, machine, make_job, prepare_run, run_logged, select_named, trainer_command,
)
from orchestrator import memory  # noqa: E402
from orchestrator.catalog import GIB  # noqa: E402
from orchestrator.spec import JobSpec  # noqa: E402
from orchestrator.strategy import STRATEGIES  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
RUNS = ROOT / "runs" / "memory_accuracy"
TARGET_MEDIAN, TARGET_WORST = 5.0, 12.0

def C(name: str, role: str, strategy: str, gpus: int, *overrides: str) -> Config:
    return Config(name, role, strategy, gpus, overrides)


CONFIGS: list[Config] = [
    # QLoRA, one GPU: 1B / 8B / 13B / 70B shapes, micro batch 1-8, seq 512-8192, r 8-64, checkpointing on/off
    C("qlora-1b-mb4-s2048", "calibration", "single_gpu", 1, "model.name=llama3-1b", "training.micro_batch_size=4"),
    C("qlora-8b-s2048", "calibration", "single_gpu", 1),
    C("qlora-8b-mb8-s512-r8-nockpt", "held_out", "single_gpu", 1, "training.micro_batch_size=8", "data.seq_len=512",
      "lora.r=8", "training.gradient_checkpointing=false"),
    C("qlora-8b-s4096-nockpt", "calibration", "single_gpu", 1, "data.seq_len=4096", "training.gradient_checkpointing=false"),
    C("qlora-8b-mb2-s8192-r64", "held_out", "single_gpu", 1, "training.micro_batch_size=2", "data.seq_len=8192", "lora.r=64"),
    C("qlora-13b-s4096-r32", "held_out", "single_gpu", 1, "model.name=llama2-13b", "data.seq_len=4096", "lora.r=32"),
    C("qlora-70b-s1024", "calibration", "single_gpu", 1, "model.name=llama3-70b", "data.seq_len=1024"),
    C("qlora-70b-mb2-s2048", "held_out", "single_gpu", 1, "model.name=llama3-70b", "training.micro_batch_size=2"),
    C("qlora-qwen7b-s2048-chunk0", "held_out", "single_gpu", 1, "model.name=qwen2.5-7b", "training.loss_chunk_tokens=0"),
    C("qlora-1b-s2048-eager", "held_out", "single_gpu", 1, "model.name=llama3-1b", "model.attn_implementation=eager"),
    # LoRA on a bf16 base
    C("lora-8b-mb2-s2048", "calibration", "single_gpu", 1, "method=lora", "training.micro_batch_size=2"),
    C("lora-1b-mb4-s4096-nockpt", "held_out", "single_gpu", 1, "method=lora", "model.name=llama3-1b",
      "training.micro_batch_size=4", "data.seq_len=4096", "training.gradient_checkpointing=false"),
    # One row per family added for issue 15 (random weights from the preset's published config, one 80 GB GPU):
    # Qwen3 q/k norms; Gemma-2 4 norms, soft-caps (eager: no sdpa), 256k vocabulary, two masks; Gemma-3's
    # decoder, q/k norms, 5 sliding : 1 global; Phi-3's fused linears on a bf16 base.
    C("qlora-qwen3-8b-s2048", "held_out", "single_gpu", 1, "model.name=qwen3-8b"),
    C("qlora-gemma2-9b-s2048-eager", "held_out", "single_gpu", 1, "model.name=gemma2-9b", "model.attn_implementation=eager"),
    C("qlora-gemma3-12b-s2048", "held_out", "single_gpu", 1, "model.name=gemma3-12b"),
    C("lora-phi3-mini-mb2-s2048", "held_out", "single_gpu", 1, "method=lora", "model.name=phi3-mini",
      "training.micro_batch_size=2"),
    # The one-GPU default path since issue 16 (levers auto: PlainEngine, regional compile, flex attention for packed
    # rows on CUDA); the rows above measured before it re-predict as they ran (common.job_as_ran)
    C("qlora-8b-mb4-s2048-levers", "held_out", "single_gpu", 1, "training.micro_batch_size=4"),
    C("lora-8b-s4096-levers", "held_out", "single_gpu", 1, "method=lora", "data.seq_len=4096"),
    C("qlora-1b-mb8-s1024-nockpt-levers", "calibration", "single_gpu", 1, "model.name=llama3-1b",
      "training.micro_batch_size=8", "data.seq_len=1024", "training.gradient_checkpointing=false"),
    C("qlora-70b-s2048-levers", "held_out", "single_gpu", 1, "model.name=llama3-70b"),
    # compiled vs eager layers without checkpointing, side by side on two shapes: the compiled rows of these pairs
    # (and qlora-1b-mb8-s1024-nockpt-levers) gave memory.layer_activation_bytes' compiled terms, so they calibrate
    C("qlora-1b-mb8-s1024-nockpt-eager", "held_out", "single_gpu", 1, "model.name=llama3-1b",
      "training.micro_batch_size=8", "data.seq_len=1024", "training.gradient_checkpointing=false", "training.compile=false"),
    C("qlora-8b-mb2-s2048-nockpt-levers", "calibration", "single_gpu", 1, "training.micro_batch_size=2",
      "training.gradient_checkpointing=false"),
    C("qlora-8b-mb2-s2048-nockpt-eager", "held_out", "single_gpu", 1, "training.micro_batch_size=2",
      "training.gradient_checkpointing=false", "training.compile=false"),
    # Full finetunes on 2 GPUs: ZeRO-2, ZeRO-3, ZeRO-3 with optimizer / param offload
    C("full-3b-zero2", "calibration", "zero2", 2, "method=full", "model.name=llama3-3b", "training.micro_batch_size=2"),
    C("full-1b-zero2-s4096", "held_out", "zero2", 2, "method=full", "model.name=llama3-1b", "data.seq_len=4096"),
    C("full-3b-zero3", "calibration", "zero3", 2, "method=full", "model.name=llama3-3b", "training.micro_batch_size=2"),
    C("full-8b-zero3", "held_out", "zero3", 2, "method=full"),
    C("full-8b-zero3-offload-opt", "held_out", "zero3_offload_optimizer", 2, "method=full"),
    C("full-3b-zero3-offload-all", "calibration", "zero3_offload_all", 2, "method=full", "model.name=llama3-3b"),
    # QLoRA sharded by ZeRO-3 (bf16 storage of the packed weights)
    C("qlora-8b-zero3", "held_out", "zero3", 2, "training.micro_batch_size=2"),
    # ... and its by-piece load on one GPU (issue 14 part 1: the load's CUDA peak against qlora_zero3_load where
    # only 1-GPU machines are lent; offload strategies are what the planner picks for big models on one GPU)
    C("qlora-8b-zero3-1gpu", "calibration", "zero3", 1, "training.micro_batch_size=2"),
    C("qlora-8b-zero3-offopt-1gpu", "calibration", "zero3_offload_optimizer", 1, "training.micro_batch_size=2"),
    C("qlora-8b-zero3-offall-1gpu", "calibration", "zero3_offload_all", 1),
    C("qlora-70b-zero3-offall-1gpu", "calibration", "zero3_offload_all", 1, "model.name=llama3-70b"),
    C("qlora-70b-zero3-s2048", "held_out", "zero3", 2, "model.name=llama3-70b"),
]


# ---------------------------------------------------------------------------
# Predictions


def deepspeed_estimate(job: JobSpec, strategy: str) -> Optional[int]:
    """DeepSpeed's model-state estimate (GPU bytes per GPU), fed total params; None if unavailable."""
    try:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    except Exception:  # noqa: BLE001 - deepspeed missing or broken: leave the column empty
        return None
    shape = job.shape()
    total = shape.num_params()
    largest = max(shape.vocab_size * shape.hidden_size, max(i * o for i, o in shape.linear_shapes().values()))
    hw = job.hardware
    s = STRATEGIES[strategy]
    if s.sharded:
        _, gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, hw.gpus_per_node, hw.nodes,
                                                          cpu_offload=s.optimizer_offload != "none",
                                                          cpu_offload_params=s.param_offload != "none", zero_init=True)
    else:  # single_gpu: ZeRO-2 formula with one GPU
        _, gpu = estimate_zero2_model_states_mem_needs(total, hw.gpus_per_node, hw.nodes, cpu_offload=False)
    return int(gpu)


def rule_of_thumb(job: JobSpec, strategy: str) -> int:
    """params x bytes per param (0.5 qlora, 2 lora, 16 full), / GPUs under ZeRO-3."""
    per = {"qlora": 0.5, "lora": 2.0, "full": 16.0}[job.method]
    div = job.hardware.world_size if STRATEGIES[strategy].sharded else 1
    return int(job.shape().num_params() * per / div)


def err_pct(pred: Optional[int], measured: Optional[int]) -> Optional[float]:
    if pred is None or not measured:
        return None
    return round(100.0 * (pred - measured) / measured, 2)


def predict_row(cfg: Config, job: JobSpec, cal: memory.Calibration = memory.CALIBRATION) -> dict:
    est = memory.estimate(job, cfg.strategy, cal)
    return {
        "predicted_peak_bytes": est.peak_allocated,
        "predicted_load_peak_bytes": est.load_peak,
        "predicted_breakdown": est.breakdown,
        "deepspeed_estimate_bytes": deepspeed_estimate(job, cfg.strategy),
        "rule_of_thumb_bytes": rule_of_thumb(job, cfg.strategy),
    }


def finish_row(row: dict) -> dict:
    m = row.get("measured_peak_bytes")
    row["error_pct"] = err_pct(row["predicted_peak_bytes"], m)
    row["load_error_pct"] = err_pct(row["predicted_load_peak_bytes"], row.get("measured_load_peak_bytes"))
    row["deepspeed_error_pct"] = err_pct(row["deepspeed_estimate_bytes"], m)
    row["rule_of_thumb_error_pct"] = err_pct(row["rule_of_thumb_bytes"], m)
    return row


# ---------------------------------------------------------------------------
# Running


def run_config(cfg: Config, timeout: int) -> dict:
    run_dir = RUNS / cfg.name
    job, job_path = prepare_run(cfg, run_dir)
    cmd = trainer_command(cfg, job_path)
    row = {"config": cfg.name, "role": cfg.role, "strategy": cfg.strategy, "gpus": cfg.gpus,
           "overrides": list(cfg.overrides), "command": " ".join(cmd)}
    row.update(predict_row(cfg, job))
    rc, tail, row["seconds"] = run_logged(cmd, child_env(), timeout)
    row["returncode"] = rc
    summary_path = run_dir / "out" / "summary.json"
    if rc == 0 and summary_path.exists():
        s = json.loads(summary_path.read_text())
        row["measured_peak_bytes"] = s.get("peak_allocated_bytes")
        row["measured_load_peak_bytes"] = s.get("load_peak_bytes")
        row["per_rank"] = s.get("per_rank")
        # The same runs are the trainer's GPU validation: keep throughput and loss too.
        row["tokens_per_s"] = s.get("tokens_per_s")
        row["final_loss"] = s.get("final_loss")
        # the levers it ran with (what --from-results re-predicts with: common.job_as_ran)
        row.update({k: s.get(k) for k in ("engine", "compiled_variants", "attention")})
    else:
        row["measured_peak_bytes"] = None
        row["oom"] = "out of memory" in tail.lower()
        row["log_tail"] = tail
    return finish_row(row)


# ---------------------------------------------------------------------------
# Reporting


def _g(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def _e(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:+.1f}"


def stats(rows: list[dict], key: str = "error_pct", role: Optional[str] = None) -> Optional[dict]:
    errs = [abs(r[key]) for r in rows if r.get(key) is not None and (role is None or r["role"] == role)]
    if not errs:
        return None
    return {"n": len(errs), "median_abs_pct": round(statistics.median(errs), 2), "worst_abs_pct": round(max(errs), 2)}


def markdown(rows: list[dict], meta: dict) -> str:
    out = [f"# Memory model accuracy ({meta.get('date', '')}, {meta.get('device', '')})", "",
           "Peak `torch.cuda.max_memory_allocated()` per GPU during training (max over ranks), GiB. "
           "Error = (predicted - measured) / measured.", "",
           "Load peak: `max_memory_allocated()` from model load through engine init (before the first step).", "",
           "| config | role | GPUs | strategy | orch predicted | measured | error % | DeepSpeed est. | error % "
           "| params x bytes | error % | load pred. | load meas. | load error % |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['config']} | {r['role']} | {r['gpus']} | {r['strategy']} | {_g(r['predicted_peak_bytes'])} | "
                   f"{_g(r.get('measured_peak_bytes'))} | {_e(r.get('error_pct'))} | {_g(r.get('deepspeed_estimate_bytes'))} | "
                   f"{_e(r.get('deepspeed_error_pct'))} | {_g(r.get('rule_of_thumb_bytes'))} | "
                   f"{_e(r.get('rule_of_thumb_error_pct'))} | {_g(r.get('predicted_load_peak_bytes'))} | "
                   f"{_g(r.get('measured_load_peak_bytes'))} | {_e(r.get('load_error_pct'))} |")
    out += ["", "| estimator | rows | median abs error % | worst abs error % |", "|---|---|---|---|"]
    for label, key, role in (("orch, all", "error_pct", None), ("orch, calibration", "error_pct", "calibration"),
                             ("orch, held out", "error_pct", "held_out"), ("orch load peak", "load_error_pct", None),
                             ("DeepSpeed estimator", "deepspeed_error_pct", None),
                             ("params x bytes", "rule_of_thumb_error_pct", None)):
        s = stats(rows, key, role)
        if s:
            out.append(f"| {label} | {s['n']} | {s['median_abs_pct']} | {s['worst_abs_pct']} |")
    out += ["", f"Target: median |error| <= {TARGET_MEDIAN} %, worst <= {TARGET_WORST} %.",
            f"Calibration: `{meta.get('calibration')}`"]
    return "\n".join(out) + "\n"


def print_table(rows: list[dict]) -> None:
    print(f"{'config':<30} {'role':<11} {'pred GiB':>8} {'meas GiB':>8} {'err %':>7} {'DS GiB':>7} {'DS err':>7} {'rule err':>8}"
          f" {'load pred':>9} {'load meas':>9} {'load err':>8}")
    for r in rows:
        print(f"{r['config']:<30} {r['role']:<11} {_g(r['predicted_peak_bytes']):>8} {_g(r.get('measured_peak_bytes')):>8} "
              f"{_e(r.get('error_pct')):>7} {_g(r.get('deepspeed_estimate_bytes')):>7} {_e(r.get('deepspeed_error_pct')):>7} "
              f"{_e(r.get('rule_of_thumb_error_pct')):>8} {_g(r.get('predicted_load_peak_bytes')):>9} "
              f"{_g(r.get('measured_load_peak_bytes')):>9} {_e(r.get('load_error_pct')):>8}")
    for role in (None, "calibration", "held_out"):
        s = stats(rows, "error_pct", role)
        if s:
            print(f"orch {role or 'all'}: n={s['n']} median |err| {s['median_abs_pct']} %, worst {s['worst_abs_pct']} %")
    s = stats(rows, "load_error_pct")
    if s:
        print(f"orch load peak: n={s['n']} median |err| {s['median_abs_pct']} %, worst {s['worst_abs_pct']} %")


def save(rows: list[dict], meta: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {**meta, "summary": {"all": stats(rows), "calibration": stats(rows, role="calibration"),
                                   "held_out": stats(rows, role="held_out"), "load_peak": stats(rows, "load_error_pct"),
                                   "deepspeed": stats(rows, "deepspeed_error_pct"),
                                   "rule_of_thumb": stats(rows, "rule_of_thumb_error_pct")},
               "rows": rows}
    out.write_text(json.dumps(payload, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(rows, meta))
    print(f"wrote {out} and {out.with_suffix('.md')}")


def repredict(rows: list[dict], cal: memory.Calibration) -> list[dict]:
    """Recompute predictions of stored rows with the current model and ``cal`` (no GPU)."""
    by_name = {c.name: c for c in CONFIGS}
    out = []
    for r in rows:
        cfg = by_name.get(r["config"]) or Config(r["config"], r["role"], r["strategy"], r["gpus"], tuple(r["overrides"]))
        job = job_as_ran(make_job(cfg, RUNS / cfg.name / "out", RUNS / cfg.name / "data.jsonl"), r)
        out.append(finish_row({**r, **predict_row(cfg, job, cal)}))
    return out


# ---------------------------------------------------------------------------
# Fitting (CPU): coordinate search over the constants that shape peak_allocated


FIT_FIELDS = ("norm_fp32_copies", "mlp_intermediates", "backward_transient", "loss_bytes_per_logit",
              "fixed_allocated_bytes", "zero3_live_fraction", "adam_temp_copies", "dequant_copies")


def fit(rows: list[dict]) -> memory.Calibration:
    """Minimize median |error| (ties: mean |error|) on the calibration rows; print held-out errors."""
    cal_rows = [r for r in rows if r["role"] == "calibration" and r.get("measured_peak_bytes")]
    if not cal_rows:
        raise SystemExit("no measured calibration rows to fit on")

    def loss(cal: memory.Calibration) -> tuple[float, float]:
        errs = [abs(r["error_pct"]) for r in repredict(cal_rows, cal)]
        return statistics.median(errs), statistics.fmean(errs)

    cal = memory.CALIBRATION
    best = loss(cal)
    for _ in range(4):
        for name in FIT_FIELDS:
            value = getattr(cal, name)
            for factor in (0.5, 0.75, 0.9, 1.1, 1.25, 1.5, 2.0):
                new = value * factor
                trial = dataclasses.replace(cal, **{name: type(value)(new)})
                score = loss(trial)
                if score < best:
                    cal, best = trial, score
    print("fitted constants (change these in memory.Calibration):")
    for name in FIT_FIELDS:
        old, new = getattr(memory.CALIBRATION, name), getattr(cal, name)
        mark = "  <- changed" if old != new else ""
        print(f"  {name:<24} {old!r:>14} -> {new!r:<14}{mark}")
    print(f"calibration rows: median |err| {best[0]:.2f} %, mean {best[1]:.2f} %")
    held = [r for r in repredict(rows, cal) if r["role"] == "held_out"]
    s = stats(held)
    if s:
        print(f"held-out rows with fitted constants: n={s['n']} median |err| {s['median_abs_pct']} %, worst {s['worst_abs_pct']} %")
    return cal


def merge_results(results: list[dict]) -> tuple[dict, list[dict]]:
    """One row per config (CONFIGS order) from several device calls' result files.

    A row that measured something replaces an earlier row of the same config; a failed
    row never replaces a measured one. Returns (meta: devices and dates joined, rows).
    """
    by_name: dict[str, dict] = {}
    for res in results:
        for row in res["rows"]:
            old = by_name.get(row["config"])
            if old is None or row.get("measured_peak_bytes") is not None or old.get("measured_peak_bytes") is None:
                by_name[row["config"]] = row
    order = {c.name: i for i, c in enumerate(CONFIGS)}
    rows = sorted(by_name.values(), key=lambda r: order.get(r["config"], len(order)))
    meta = {"device": ", ".join(sorted({r.get("device", "") for r in results} - {""})),
            "date": ", ".join(sorted({str(r.get("date", ""))[:10] for r in results} - {""}))}
    return meta, rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated config names")
    ap.add_argument("--list", action="store_true", help="list configs with their predictions and exit")
    ap.add_argument("--from-results", metavar="FILE", nargs="+",
                    help="re-render predictions for stored measurements (no GPU); several files (one per device "
                         "call) are merged, a measured row of a later file replacing the same config's earlier row")
    ap.add_argument("--fit", action="store_true", help="with --from-results: fit Calibration on the calibration rows")
    ap.add_argument("--out", default=str(RESULTS / "memory_accuracy.json"))
    ap.add_argument("--timeout", type=int, default=900, help="seconds per config")
    args = ap.parse_args()

    configs = select_named(CONFIGS, args.only, "config")
    if configs is None:
        return 2

    if args.list:
        print(f"{'config':<30} {'role':<11} {'strategy':<24} {'GPUs':>4} {'pred GiB':>8}  overrides")
        for c in configs:
            job = make_job(c, RUNS / c.name / "out", RUNS / c.name / "data.jsonl")
            e = memory.estimate(job, c.strategy)
            print(f"{c.name:<30} {c.role:<11} {c.strategy:<24} {c.gpus:>4} {e.peak_allocated / GIB:>8.2f}  {' '.join(c.overrides)}")
        return 0

    meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "calibration": dataclasses.asdict(memory.CALIBRATION)}
    if args.from_results:
        stored, rows = merge_results([json.loads(Path(f).read_text()) for f in args.from_results])
        if args.only:
            rows = [r for r in rows if r["config"] in args.only.split(",")]
        if args.fit:
            fit(rows)
            return 0
        rows = repredict(rows, memory.CALIBRATION)
        meta.update(device=stored["device"], measured_on=stored["date"], sources=args.from_results, repredicted=True)
        print_table(rows)
        save(rows, meta, Path(args.out))
        return 0

    meta["device"], meta["gpus_available"] = machine()
    rows = []
    for c in configs:
        print(f"running {c.name} ({c.strategy}, {c.gpus} GPU) ...", flush=True)
        row = run_config(c, args.timeout)
        rows.append(row)
        print(f"  rc={row['returncode']} {row['seconds']} s predicted {_g(row['predicted_peak_bytes'])} GiB "
              f"measured {_g(row.get('measured_peak_bytes'))} GiB error {_e(row.get('error_pct'))} %", flush=True)
        save(rows, meta, Path(args.out))  # after every config: a timeout later keeps what was measured
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
