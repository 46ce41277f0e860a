"""Shared helpers for the trainer tests (tests/test_train_*.py).

The runs are real: the trainer in a subprocess, 2-process runs through orch's
launcher (orchestrator/launch.py, what `orch submit` runs; 2 CPU processes, gloo). Models are tiny (hidden 64,
2 layers, vocab 512) so a whole run takes seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import yaml

REPO = Path(__file__).resolve().parents[1]

# Lines of short, highly repetitive text: a tiny model's loss falls fast on it.
SENTENCES = [
    "the cat sat on the mat. the cat sat on the mat.",
    "a dog runs in the park. a dog runs in the park.",
    "we like green tea. we like green tea. we like green tea.",
    "one two three four five. one two three four five.",
]


def write_data(folder: Path, lines: int = 48) -> Path:
    path = folder / "data.jsonl"
    with path.open("w") as f:
        for i in range(lines):
            f.write(json.dumps({"text": SENTENCES[i % len(SENTENCES)]}) + "\n")
    return path


def tiny_job(folder: Path, name: str, **sections) -> Path:
    """A tiny-llama job in ``folder`` (random weights, fp32, 2 layers); ``sections`` update the defaults."""
    data = write_data(folder) if not (folder / "data.jsonl").exists() else folder / "data.jsonl"
    job = {
        "name": name,
        "model": {"name": "tiny-llama", "weights": "random", "dtype": "fp32"},
        "method": "full",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "quantization": {"compute_dtype": "fp32"},
        "data": {"paths": [str(data)], "format": "text", "seq_len": 32},
        "training": {"micro_batch_size": 2, "global_batch_size": 8, "gradient_checkpointing": True,
                     "lr": 3.0e-3, "warmup_steps": 0, "lr_schedule": "constant", "max_steps": 6,
                     "save_every": 0, "output_dir": str(folder / "out" / name), "loss_chunk_tokens": 24},
        "hardware": {"gpu_memory_gb": 4, "host_ram_gb": 8, "cpus_per_node": 2},
        "strategy": "single_gpu",
        "logging": {"wandb_mode": "disabled"},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            job.setdefault(key, {}).update(value)
        else:
            job[key] = value
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e["HF_HUB_OFFLINE"] = "1"
    e["HF_DATASETS_OFFLINE"] = "1"
    e["WANDB_SILENT"] = "true"
    e.pop("WANDB_API_KEY", None)  # tests never log online
    return e


def run_trainer(job: Path, nprocs: int = 1, args: tuple[str, ...] = (), overrides: tuple[str, ...] = (),
                timeout: int = 600, cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
    """Run the trainer: plain python for 1 process, orch's launcher for more."""
    if nprocs == 1:
        cmd = [sys.executable, "-m", "orchestrator.train", "--job", str(job), *args, *overrides]
    else:
        cmd = [sys.executable, "-m", "orchestrator.launch", "--nproc-per-node", str(nprocs), "--master-port",
               str(_port()), "--", "--job", str(job), *args, *overrides, f"hardware.gpus_per_node={nprocs}"]
    return subprocess.run(cmd, cwd=cwd or job.parent, env=env(), capture_output=True, text=True, timeout=timeout)


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check(proc: subprocess.CompletedProcess, code: int = 0) -> None:
    if proc.returncode != code:
        raise AssertionError(f"exit {proc.returncode} (wanted {code})\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")


def _records(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def metrics(out: Path, rank: int = 0) -> list[dict]:
    """The training log lines of ``rank`` (not the eval lines)."""
    return [r for r in _records(out) if r["rank"] == rank and "eval_loss" not in r]


def evals(out: Path) -> list[dict]:
    """The eval lines (rank 0 writes one per eval of the whole eval split)."""
    return [r for r in _records(out) if "eval_loss" in r]


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(out)}


def loss_parity(a: Path, b: Path, rtol: float) -> float:
    """The max relative difference of two finished 6-step runs' loss curves (jobs ``a``, ``b``); asserts it is <= rtol."""
    la, lb = losses(out_dir(a)), losses(out_dir(b))
    assert sorted(la) == sorted(lb) == [1, 2, 3, 4, 5, 6]
    worst = max(abs(la[s] - lb[s]) / abs(la[s]) for s in la)
    print(f"max relative loss difference {a.stem} vs {b.stem}: {worst:.3g}")
    assert worst <= rtol, (la, lb)
    return worst


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def out_dir(job: Path) -> Path:
    return Path(yaml.safe_load(job.read_text())["training"]["output_dir"])


def stopped_copy(job: Path, folder: Path, after_step: int) -> Path:
    """A copy, in ``folder``, of ``job`` and its finished run as a run stopped after ``after_step`` left it
    (later checkpoints, summary.json and metrics.jsonl gone); returns the copied job. Resuming it
    retrains the steps after ``after_step``."""
    shutil.copytree(job.parent, folder)
    copied = folder / job.name
    copied.write_text(copied.read_text().replace(str(job.parent), str(folder)))
    out = out_dir(copied)
    for ckpt in (out / "checkpoints").glob("step*"):
        if ckpt.is_dir() and int(ckpt.name.removeprefix("step")) > after_step:
            shutil.rmtree(ckpt)
    (out / "summary.json").unlink()
    (out / "metrics.jsonl").unlink()
    return copied
