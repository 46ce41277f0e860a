"""Atomic DeepSpeed checkpoints and resume discovery.

Layout: ``<output_dir>/checkpoints/step00000010/`` holds DeepSpeed's files
(model + optimizer partitions of every rank), ``rng_rank<R>.pt`` per rank, and
``COMPLETE`` (JSON: step, world_size, strategy). Rank 0 writes ``COMPLETE`` last,
after a barrier that every rank reaches only once its own files are written, so
a checkpoint without it is partial (killed mid-save) and is ignored by resume
and deleted on the next save of that step.

On the same number of processes a checkpoint is loaded as written (ZeRO
partitions and RNG state per rank). On another number, DeepSpeed's universal
checkpoint takes over: `to_universal` converts the checkpoint once, on demand,
into ``<checkpoint>/universal/`` (one folder per trainable parameter with its
fp32 master and Adam moments, whole, so any world size can partition them), and
the engine loads that with DeepSpeed's ``load_universal``. The conversion writes
into ``universal.partial/`` and renames it into place after its own
``COMPLETE``; a folder without that marker (a killed or failed conversion) is
never loaded and is removed before the next try. The RNG of a resumed rank is
then reseeded from (seed, step, rank): the per-rank streams of the old run have
no counterpart.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from orchestrator import preflight
from orchestrator.catalog import GIB
from orchestrator.errors import Exit, OrchError
from orchestrator.faults import NO_FAULTS, Faults
from orchestrator.strategy import STRATEGIES

MARKER = "COMPLETE"
PLAIN_STATE_FILE = "plain_engine.pt"
"""The one file PlainEngine (orchestrator/engine.py) writes into a checkpoint folder."""
DEEPSPEED_STATE_FILES = "*mp_rank_*_model_states.pt"
"""What DeepSpeed writes there: mp_rank_00_model_states.pt (stage 0-2) or
zero_pp_rank_<R>_mp_rank_00_model_states.pt (stage 3)."""
UNIVERSAL = "universal"
"""The folder inside a checkpoint that holds its universal form (`to_universal`)."""


class CheckpointError(OrchError):
    """A checkpoint cannot be used (one line)."""

    code = Exit.TRAIN_FAILED


def tag_for(step: int) -> str:
    return f"step{step:08d}"


@dataclass
class CheckpointInfo:
    """A complete checkpoint on disk."""

    path: Path
    tag: str
    step: int
    world_size: int
    strategy: str
    global_batch: Optional[int] = None
    """Sequences per optimizer step of the run that wrote it (None: a marker from before orch recorded it)."""


def read_info(folder: Path) -> Optional[CheckpointInfo]:
    """The checkpoint in ``folder`` when it is complete (its marker is there and ours), else None."""
    marker = folder / MARKER
    if not (folder.is_dir() and marker.is_file()):
        return None
    try:
        meta = json.loads(marker.read_text())
        batch = meta.get("global_batch")
        return CheckpointInfo(folder, folder.name, int(meta["step"]), int(meta["world_size"]), str(meta["strategy"]),
                              None if batch is None else int(batch))
    except (ValueError, KeyError, OSError, AttributeError, TypeError):
        return None  # a marker that is not ours / unreadable: not complete


def latest(root: Path) -> Optional[CheckpointInfo]:
    """The complete checkpoint with the highest step under ``root``, or None."""
    if not root.is_dir():
        return None
    complete = [info for info in map(read_info, root.iterdir()) if info is not None]
    return max(complete, key=lambda info: info.step, default=None)


def written_by(folder: Path) -> Optional[str]:
    """Which engine wrote the checkpoint folder: 'plain', 'deepspeed', or None (neither's files)."""
    if (folder / PLAIN_STATE_FILE).is_file():
        return "plain"
    if any(folder.glob(DEEPSPEED_STATE_FILES)):
        return "deepspeed"
    return None


def rng_state() -> dict:
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, root: Path, step: int, client_state: dict, rank: int, world: int, strategy: str, global_batch: int,
         barrier: Callable[[], None], exclude_frozen: bool, faults: Faults = NO_FAULTS) -> Path:
    """Write checkpoint ``step`` on every rank; returns its folder. Collective: all ranks call it.

    ``exclude_frozen`` (lora/qlora) leaves the frozen base weights out: resume rebuilds
    them exactly as the first start did (same seed, or the same pretrained folder), so
    saving them would only cost disk (about 40 GiB per checkpoint for a 70B QLoRA job).
    ``faults``: the test seam (orchestrator/faults.py), called between the files and the marker.
    """
    import torch

    tag = tag_for(step)
    path = root / tag
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if path.exists():  # a partial earlier try (or a re-save of the same step)
            shutil.rmtree(path)
    barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False,
                           exclude_frozen_parameters=exclude_frozen)
    torch.save(rng_state(), path / f"rng_rank{rank}.pt")
    faults.in_save(step)
    barrier()  # every rank's files are on disk
    if rank == 0:
        tmp = path / (MARKER + ".tmp")
        tmp.write_text(json.dumps({"step": step, "world_size": world, "strategy": strategy,
                                   "global_batch": global_batch}))
        tmp.replace(path / MARKER)
    barrier()
    return path


def check_resumable(info: CheckpointInfo, writer: Optional[str], strategy: str, engine: str, world: int,
                    global_batch: int) -> None:
    """Raise CheckpointError (naming what to set) unless a run with ``strategy`` on the ``engine``
    ('plain' or 'deepspeed'), ``world`` processes and ``global_batch`` sequences per step can continue
    checkpoint ``info``, written by the ``writer`` engine (`written_by`). Pure: decided before anything
    is loaded.

    The global batch and the ZeRO stage must stay: step s trains global batch s of the seeded data
    stream at any world size (the data position is counted in global batches), and DeepSpeed loads a
    universal checkpoint only into the ZeRO stage that wrote it (2 -> 3 and 3 -> 2 fail inside
    DeepSpeed; offload may change). Another process count needs ZeRO without NVMe optimizer offload:
    the universal form is made from ZeRO's optimizer partitions, and NVMe swap files are per rank."""
    if info.strategy not in STRATEGIES:
        raise CheckpointError(f"{info.path}: written under strategy {info.strategy!r}, which this orch does not know")
    saved, now = STRATEGIES[info.strategy], STRATEGIES[strategy]
    if info.global_batch is not None and info.global_batch != global_batch:
        raise CheckpointError(f"{info.path}: trained with training.global_batch_size {info.global_batch}, this run has "
                              f"{global_batch}; a resume keeps it (the data position and the lr schedule count "
                              "global batches)", Exit.BAD_SPEC)
    if saved.zero_stage != now.zero_stage:
        raise CheckpointError(f"{info.path}: saved under strategy {info.strategy} (ZeRO stage {saved.zero_stage}), "
                              f"this run's {strategy} is stage {now.zero_stage}; resume with strategy: "
                              f"{info.strategy}", Exit.BAD_SPEC)
    if info.world_size == world:
        if writer is not None and writer != engine:
            raise CheckpointError(f"{info.path}: written by the {writer} engine, this run uses the {engine} "
                                  f"engine; resume it with training.engine={writer}", Exit.BAD_SPEC)
        return
    where = f"{info.path}: saved by {info.world_size} processes, this run has {world}"
    if writer != "deepspeed" or engine != "deepspeed" or saved.zero_stage == 0:
        raise CheckpointError(f"{where}; only a ZeRO checkpoint changes its number of processes (strategy "
                              f"{info.strategy} has no ZeRO): resume it on {info.world_size}", Exit.BAD_SPEC)
    if "nvme" in (saved.optimizer_offload, now.optimizer_offload):
        raise CheckpointError(f"{where}; NVMe optimizer offload keeps per-rank swap files that do not re-partition: "
                              f"resume it on {info.world_size}", Exit.BAD_SPEC)


def resume_point(output_dir: Path, strategy: str, engine: str, world: int, global_batch: int) -> Optional[CheckpointInfo]:
    """The checkpoint a ``--resume`` of the run in ``output_dir`` continues, checked against a run with
    these (`check_resumable`); None when there is none. Called where the run is submitted (no queue
    wait for a resume that cannot work) and by the trainer."""
    info = latest(output_dir / "checkpoints")
    if info is not None:
        check_resumable(info, written_by(info.path), strategy, engine, world, global_batch)
    return info


def kept_zero_stage(output_dir: Path) -> Optional[int]:
    """The ZeRO stage a ``--resume`` of the run in ``output_dir`` keeps (that of its latest complete
    checkpoint; None when there is none): strategy auto chooses among that stage's strategies."""
    info = latest(output_dir / "checkpoints")
    known = info is not None and info.strategy in STRATEGIES  # an unknown one: check_resumable says so
    return STRATEGIES[info.strategy].zero_stage if known else None


def universal_dir(info: CheckpointInfo) -> Optional[Path]:
    """The complete universal form of ``info``, or None when there is none (or only a partial one)."""
    folder = info.path / UNIVERSAL
    return folder if (folder / MARKER).is_file() else None


def to_universal(info: CheckpointInfo, faults: Faults = NO_FAULTS) -> Path:
    """The universal form of checkpoint ``info`` (DeepSpeed's ``ds_to_universal``), made now unless a
    complete one is there; returns its folder. One process calls it (rank 0; the others wait).

    The converter runs in a child process (it forks its own workers) into ``universal.partial/``; only
    a run that exits 0 gets the marker and the rename, so a failed or killed conversion leaves nothing
    `universal_dir` accepts. Raises CheckpointError (the checkpoint itself is left as it was)."""
    done = universal_dir(info)
    if done is not None:
        return done
    final, partial = info.path / UNIVERSAL, info.path / (UNIVERSAL + ".partial")
    for stale in (final, partial):  # left by a conversion that did not finish: never loaded
        if stale.exists():
            shutil.rmtree(stale)
    need, free = conversion_bytes(info.path), preflight.disk_free(info.path)
    if free < need:
        raise CheckpointError(f"{info.path}: converting it for another number of processes needs about "
                              f"{need / GIB:.1f} GiB free there, {free / GIB:.1f} GiB are; make room and resume again")
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(info.path),
           "--output_folder", str(partial), "--num_extract_workers", "1", "--num_merge_workers", "1",
           # the version record Megatron-DeepSpeed's clients save; orch's checkpoints have no tensor or
           # pipeline parallelism for it to describe
           "--inject_missing_state"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        lines = [line.strip() for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
        why = lines[-1] if lines else f"exit {proc.returncode}"
        raise CheckpointError(f"{info.path}: DeepSpeed's universal conversion (for a resume on another number "
                              f"of processes) failed: {why}; the checkpoint is unchanged and resumes on "
                              f"{info.world_size} processes")
    faults.in_convert(info.step)
    (partial / MARKER).write_text(json.dumps({"step": info.step, "world_size": info.world_size,
                                               "strategy": info.strategy}))
    partial.rename(final)
    return final


def conversion_bytes(folder: Path) -> int:
    """Disk the universal conversion of checkpoint ``folder`` takes at its peak (an upper bound): the
    converter's temporary fragments (the fp32 masters and Adam moments of ZeRO's optimizer partitions,
    once) plus the universal form (the same once more, a copy of the model-states files, and, under
    ZeRO-3, one partition's optimizer state dict again as ``zero/optimizer_state.pt``: measured by
    benchmarks/universal_resume.py)."""
    optim = [f.stat().st_size for f in folder.glob("*optim_states.pt")]
    models = sum(f.stat().st_size for f in folder.glob(DEEPSPEED_STATE_FILES))
    return 2 * sum(optim) + models + max(optim, default=0)


def reseed(seed: int, step: int, rank: int) -> None:
    """Every RNG of this rank from (seed, step, rank): a resume on another number of processes, whose
    per-rank RNG states have no counterpart in the checkpoint."""
    import numpy as np
    import torch

    mixed = int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])
    random.seed(mixed)
    np.random.seed(mixed)
    torch.manual_seed(mixed)


def load(engine, info: CheckpointInfo, rank: int, world: int, strict: bool, seed: int) -> dict:
    """Load ``info`` into ``engine`` and restore this rank's RNG; returns the client state.

    On another number of processes than ``info`` was saved by, the engine must have been made with
    DeepSpeed's ``checkpoint.load_universal`` and `to_universal` must have run (the recipe does both)."""
    import torch

    universal = info.world_size != world
    if universal:
        folder = universal_dir(info)
        if folder is None:
            raise CheckpointError(f"{info.path}: saved by {info.world_size} processes, this run has {world}, and "
                                  "its universal form is missing")
        load_dir, tag = info.path, folder.name
    else:
        load_dir, tag = info.path.parent, info.tag
    # strict=False for lora/qlora: the frozen base weights were not saved (see save), and
    # bitsandbytes adds quant-state keys (absmax, quant_map, ...) that load_state_dict rejects.
    loaded, client = engine.load_checkpoint(str(load_dir), tag=tag, load_module_strict=strict,
                                            load_optimizer_states=True, load_lr_scheduler_states=True)
    if loaded is None:
        raise CheckpointError(f"{info.path}: DeepSpeed could not load this checkpoint")
    if universal:
        reseed(seed, info.step, rank)
    else:
        set_rng_state(torch.load(info.path / f"rng_rank{rank}.pt", weights_only=False))
    return client or {}
