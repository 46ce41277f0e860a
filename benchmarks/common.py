"""What the benchmarks share: the base job every configuration overrides, running orch's trainer
from the repo root, the --only selector, the timing arguments and the machine description.

memory_accuracy.py, throughput.py and planner_quality.py import these; nothing here measures anything.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Optional, Sequence, TypeVar

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from orchestrator.spec import JobSpec, apply_overrides, dump_job, parse_yaml_text, validate_dict  # noqa: E402

T = TypeVar("T")

BASE: dict = {  # the job every benchmark configuration overrides: a random-weight preset, a few steps
    "name": "memacc",
    "model": {"name": "llama3-8b", "weights": "random", "dtype": "bf16"},
    "method": "qlora",
    "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
    "quantization": {"type": "nf4", "double_quant": True, "compute_dtype": "bf16"},
    "data": {"paths": ["PLACEHOLDER"], "format": "text", "seq_len": 2048, "packing": True},
    "training": {"micro_batch_size": 1, "global_batch_size": 1, "gradient_checkpointing": True, "lr": 1e-4,
                 "max_steps": 3, "save_every": 0, "output_dir": "PLACEHOLDER"},
    "hardware": {"gpus_per_node": 1, "gpu": "H100-80GB", "host_ram_gb": 128, "cpus_per_node": 16},
    "logging": {"wandb_mode": "disabled", "log_every": 1},
}


@dataclass(frozen=True)
class Config:
    """One measured configuration."""

    name: str
    """Short unique name (--only)."""
    role: str
    """What the run is for: memory_accuracy's 'calibration' (constants are fitted on it) or 'held_out' (only
    checked), or 'throughput'."""
    strategy: str
    """Strategy forced for the run."""
    gpus: int
    """GPUs on one node."""
    overrides: tuple[str, ...]
    """Spec overrides on BASE (dotted.key=value)."""


def _deep_set(data: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        data = data.setdefault(p, {})
    data[leaf] = value


def make_job(cfg: Config, run_dir: Path, data_path: Path, name_prefix: str = "memacc") -> JobSpec:
    """The resolved job for a config, validated like any spec (nothing is written)."""
    base = json.loads(json.dumps(BASE))
    base["name"] = f"{name_prefix}-{cfg.name}"
    _deep_set(base, "data.paths", [str(data_path)])
    _deep_set(base, "training.output_dir", str(run_dir))
    _deep_set(base, "hardware.gpus_per_node", cfg.gpus)
    _deep_set(base, "strategy", cfg.strategy)
    overrides = list(cfg.overrides)
    mb = next((int(o.split("=")[1]) for o in overrides if o.startswith("training.micro_batch_size=")), 1)
    overrides.append(f"training.global_batch_size={mb * cfg.gpus}")
    data, src = parse_yaml_text(json.dumps(base), f"config {cfg.name}")
    return validate_dict(apply_overrides(data, overrides), src)


def job_as_ran(job: JobSpec, record: dict) -> JobSpec:
    """``job`` with the speed levers its run used made explicit, from a result row (or summary.json).

    Rows record what the trainer reported: ``engine`` ('plain' or 'deepspeed'), ``compiled_variants``
    (None when the layers ran eagerly) and ``attention`` (the kernel). Rows measured before the
    levers existed (up to 2026-11-23: benchmarks/results/device/h100-call1..4, throughput.json) have
    none of these: they ran DeepSpeed's engine with eager layers and the spec's attention, sdpa
    unless their overrides set another. Re-predicting or re-fitting on a row must use these, not
    today's auto, which resolves to other levers.
    """
    attention = record.get("attention") or job.model.attn_implementation
    if attention == "auto":
        attention = "sdpa"
    training = job.training.model_copy(update={"engine": record.get("engine") or "deepspeed",
                                               "compile": record.get("compiled_variants") is not None})
    model = job.model.model_copy(update={"attn_implementation": attention})
    return job.model_copy(update={"model": model, "training": training})


def write_data(path: Path, job: JobSpec) -> None:
    """Synthetic text filling every row of every step (byte-level tokenizer: ~1 token per byte).

    Examples are short (10-40 words, ~60-250 tokens), so every packed row holds
    several and transformers builds the block-diagonal mask the model assumes.
    """
    need = job.training.micro_batch_size * job.hardware.world_size * job.data.seq_len * (job.training.max_steps + 2) * 2
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "memory", "tensor", "layer", "token", "model", "shard"]
    with path.open("w") as f:
        written = 0
        while written < need:
            text = " ".join(rng.choice(words) for _ in range(rng.randint(10, 40)))
            f.write(json.dumps({"text": text}) + "\n")
            written += len(text)


def prepare_run(cfg: Config, run_dir: Path, name_prefix: str = "memacc") -> tuple[JobSpec, Path]:
    """A fresh ``run_dir`` with synthetic data and the resolved job YAML; the trainer writes into run_dir/out."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    data_path = run_dir / "data.jsonl"
    job = make_job(cfg, run_dir / "out", data_path, name_prefix)
    write_data(data_path, job)
    job_path = run_dir / "job.yaml"
    job_path.write_text(dump_job(job))
    return job, job_path


def child_env() -> dict:
    """Environment for benchmark subprocesses: the repo importable, NVLink multicast off."""
    # Keep any PYTHONPATH already set (the device run installs wheels into /tmp/site).
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=pythonpath, NCCL_NVLS_ENABLE="0")


def trainer_command(cfg: Config, job_path: Path) -> list[str]:
    """orch's trainer: plain python on 1 GPU, orch's launcher (what `orch submit` runs) on more."""
    if cfg.gpus == 1:
        return [sys.executable, "-m", "orchestrator.train", "--job", str(job_path)]
    port = str(29500 + random.Random(cfg.name).randrange(1000))
    return [sys.executable, "-m", "orchestrator.launch", "--nproc-per-node", str(cfg.gpus), "--master-port", port,
            "--", "--job", str(job_path)]


def run_logged(cmd: list[str], env: dict, timeout: int, tail_chars: int = 3000) -> tuple[int, str, float]:
    """Run ``cmd`` from the repo root: (return code, last output characters, seconds); 124 on timeout."""
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-tail_chars:]
    except subprocess.TimeoutExpired:
        rc, tail = 124, "timed out"
    return rc, tail, round(time.time() - start, 1)


def select_named(items: Sequence[T], only: Optional[str], noun: str, hint: str = "") -> Optional[list[T]]:
    """The items whose ``.name`` is in the comma-separated ``only`` (all when empty), in their own
    order; None after a one-line error naming the unknown ones. Shared by the benchmarks' --only."""
    if not only:
        return list(items)
    wanted = only.split(",")
    unknown = [w for w in wanted if w not in {i.name for i in items}]
    if unknown:
        print(f"unknown {noun}(s): {', '.join(unknown)}; see --list{hint}", file=sys.stderr)
        return None
    return [i for i in items if i.name in wanted]


def versions() -> dict:
    found = {}
    for pkg in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "deepspeed"):
        try:
            found[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            found[pkg] = None
    return found


def machine() -> tuple[str, int]:
    """(device name, GPU count) without creating a CUDA context in this process."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0), torch.cuda.device_count()
        return "cpu", 0
    except Exception:  # noqa: BLE001 - no torch: report rather than fail
        return "unknown", 0


def add_timing_args(ap: argparse.ArgumentParser, steps: int, timeout: int, timeout_help: str) -> None:
    """--timeout/--steps/--warmup of the timed benchmarks (throughput and planner_quality: the same timing rule)."""
    ap.add_argument("--timeout", type=int, default=timeout, help=timeout_help)
    ap.add_argument("--steps", type=int, default=steps, help="optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of tokens/s (>= 1)")


def check_timing_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not 1 <= args.warmup < args.steps:
        ap.error("--warmup must be at least 1 and less than --steps")
