"""Checks of the environment that run before any GPU time is spent.

`orch submit` runs them before sbatch (and before the local launcher), and the
trainer runs them again at start (the job may run on a node that sees another
file system, and later). They also decide what happens to a run already in the
output dir (`check_run_folder`, `move_run_aside`). Pure Python, no torch:
`checkpoint_bytes` is integer arithmetic on the spec and the model shape, like
the memory model it borrows from.
"""

from __future__ import annotations

import datetime
import os
import shutil
from pathlib import Path
from typing import Optional

from orchestrator import memory
from orchestrator.catalog import GIB
from orchestrator.errors import Exit, OrchError
from orchestrator.spec import JobSpec
from orchestrator.strategy import STRATEGIES


class PreflightError(OrchError):
    """The environment cannot run this job (one line, naming the path). At submit time that is a
    failed submit; the trainer, which checks again on its node, exits BAD_SPEC instead (see train.run)."""

    code = Exit.SUBMIT_FAILED


def checkpoint_bytes(job: JobSpec, strategy: str) -> int:
    """Bytes one checkpoint takes on disk, summed over all ranks.

    full: the module state dict (model.dtype weights) plus the optimizer state of
    every parameter: fp32 master copy, Adam m and v (3 x 4 bytes; an fp32 model's
    master copy is counted too, which keeps the estimate an upper bound).
    lora/qlora: the frozen base weights are left out (checkpoint.save), so the
    module state holds the LoRA weights plus, for qlora, the quant constants that
    bitsandbytes writes as extra state; then the LoRA optimizer state and the
    PEFT adapter copy (``adapter/``, model.dtype). Small files (RNG, client
    state) are ignored.
    """
    shape = job.shape()
    counts = memory.param_counts(job, shape)
    d = memory.DTYPE_BYTES[job.model.dtype]
    if job.method == "full":
        return counts.total * d + counts.trainable * 3 * memory.FP32
    storage = job.quantization.storage_for(STRATEGIES[strategy].sharded)
    _, _, consts = memory.base_weight_bytes(job, shape, storage)
    lora_weights = counts.lora * d
    # the LoRA weights are written twice: in the module state and as the PEFT adapter
    return consts + 2 * lora_weights + counts.trainable * 3 * memory.FP32


def disk_free(folder: Path) -> int:
    """Bytes free for this user on the file system of ``folder`` (what the room check compares with;
    tests replace this function to give the check any figure)."""
    return shutil.disk_usage(folder).free


def check_output_dir(out: Path, need: int) -> None:
    """``out`` (or its nearest existing parent) is a writable folder with ``need`` bytes free."""
    probe = Path(os.path.abspath(out))
    while not probe.exists():
        probe = probe.parent
    field = "training.output_dir"
    if not probe.is_dir():
        raise PreflightError(f"{field}: {str(out)!r} cannot be created: {str(probe)!r} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PreflightError(f"{field}: {str(probe)!r} is not writable")
    free = disk_free(probe)
    if free < need:
        raise PreflightError(f"{field}: {str(probe)!r} has {free / GIB:.1f} GiB free, one checkpoint of this job "
                             f"needs {need / GIB:.1f} GiB")


# ---------------------------------------------------------------------------
# a run already in the output dir

RUN_FILES = ("checkpoints", "metrics.jsonl", "summary.json")
"""Entries of an output dir that show it holds a run."""
KEPT_ON_RESTART = ("logs", "previous", "data_cache")
"""Entries --restart leaves in place: Slurm's logs (the running job's own among them), the runs
moved aside before, and the tokenized-data cache (keyed by its inputs, so still right)."""


def run_files(out: Path) -> list[str]:
    """The entries of ``out`` that show it holds a run (none: it holds no run)."""
    return [name for name in RUN_FILES if (out / name).exists()]


def check_run_folder(out: Path, resume: bool, restart: bool) -> None:
    """An output dir that holds a run is used only when asked how: --resume continues it, --restart
    moves it aside (`move_run_aside`). Without either it is refused, so a second start never silently
    trains from step 0 over the first run's checkpoints, metrics and wandb run."""
    found = run_files(out)
    if found and not (resume or restart):
        raise OrchError(f"training.output_dir: {str(out)!r} holds a run ({', '.join(found)}); continue it with "
                        f"--resume, or start afresh with --restart (moves it to {str(out / 'previous')!r})",
                        Exit.BAD_SPEC)


def move_run_aside(out: Path, now: datetime.datetime) -> Optional[Path]:
    """--restart: move what the previous run in ``out`` left (everything but `KEPT_ON_RESTART`) into
    ``out/previous/<UTC time>/`` and return that folder; None when there was nothing to move.
    Nothing is deleted."""
    entries = [p for p in sorted(out.iterdir()) if p.name not in KEPT_ON_RESTART] if out.is_dir() else []
    if not entries:
        return None
    stamp = now.astimezone(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = out / "previous" / stamp
    n = 1
    while target.exists():  # two restarts within a second
        target = out / "previous" / f"{stamp}-{n}"
        n += 1
    target.mkdir(parents=True)
    for entry in entries:
        entry.rename(target / entry.name)
    return target
