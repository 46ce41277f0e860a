"""Per-rank check of the sharded QLoRA ZeRO-3 load (issue 14 part 1) on a memory_accuracy result file.

    PYTHONPATH=$PWD python benchmarks/device/qlora_zero3_check.py RESULT.json [RESULT.json ...]

For each 2-GPU qlora ZeRO-3 row of benchmarks/memory_accuracy.py's output (qlora-8b-zero3,
qlora-70b-zero3-s2048) and each rank, prints what the rank measured next to the memory model:

* packed 4-bit bytes held right after the build (before deepspeed.initialize) against half the model's;
* the build peak (torch.cuda.max_memory_allocated after the build) against ``memory.build_peak_bytes``
  (``qlora_zero3_load``: sharded states plus one piece) and against the whole model with its adapters,
  which the load held on every rank before the by-piece load (its floor);
* the load peak (build + engine init) and the training peak against ``memory.estimate``.

Exit 1 when a rank held more than 1 % over half the packed bytes after the build or its build peak is
over the whole-model floor (the load is not sharded); the error columns are for the README.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.common import Config, make_job  # noqa: E402
from benchmarks.memory_accuracy import RUNS  # noqa: E402
from orchestrator import memory  # noqa: E402
from orchestrator.catalog import GIB  # noqa: E402


def pct(pred: int, measured: int) -> str:
    return f"{100.0 * (pred - measured) / measured:+.1f}"


def check_row(row: dict) -> bool:
    """Print the per-rank table of one result row; False when the load was not sharded."""
    cfg = Config(row["config"], row["role"], row["strategy"], row["gpus"], tuple(row["overrides"]))
    job = make_job(cfg, RUNS / cfg.name / "out", RUNS / cfg.name / "data.jsonl")
    shape = job.shape()
    build = memory.build_peak_bytes(job, cfg.strategy, shape)
    whole = memory.whole_model_bytes(job, shape, job.quantization.storage_for(True))
    est = memory.estimate(job, cfg.strategy)
    print(f"{cfg.name} ({cfg.strategy}, {cfg.gpus} GPUs): predicted build {build / GIB:.2f} GiB "
          f"(whole model {whole / GIB:.2f} GiB), load {est.load_peak / GIB:.2f} GiB, training {est.peak_allocated / GIB:.2f} GiB")
    if row.get("returncode") != 0 or not row.get("per_rank"):
        print(f"  no measurement (rc {row.get('returncode')}): {str(row.get('log_tail', ''))[-600:]}")
        return False
    ok = True
    print(f"  {'rank':>4} {'4bit built/half':>15} {'build GiB':>9} {'err %':>6} {'load GiB':>8} {'err %':>6} {'train GiB':>9} {'err %':>6}")
    for r in row["per_rank"]:
        half = r["quantized_bytes_full"] / cfg.gpus
        ratio = r["quantized_bytes_local_built"] / half
        b, ld, tr = r["build_peak_allocated"], r["load_peak_allocated"], r["peak_allocated"]
        print(f"  {r['rank']:>4} {ratio:>15.4f} {b / GIB:>9.2f} {pct(build, b):>6} {ld / GIB:>8.2f} "
              f"{pct(est.load_peak, ld):>6} {tr / GIB:>9.2f} {pct(est.peak_allocated, tr):>6}")
        ok = ok and ratio <= 1.01 and b < whole
    return ok


def main(paths: list[str]) -> int:
    rows = [row for p in paths for row in json.loads(Path(p).read_text())["rows"]
            if row["strategy"].startswith("zero3") and "qlora" in row["config"]]
    if not rows:
        print("no qlora ZeRO-3 rows in " + ", ".join(paths))
        return 1
    results = [check_row(row) for row in rows]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
