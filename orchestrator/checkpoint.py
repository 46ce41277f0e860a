"""Atomic DeepSpeed checkpoints and resume discovery.

Layout: ``<output_dir>/checkpoints/step00000010/`` holds DeepSpeed's files
(model + optimizer partitions of every rank), ``rng_rank<R>.pt`` per rank, and
``COMPLETE`` (JSON: step, world_size, strategy). Rank 0 writes ``COMPLETE`` last,
after a barrier that every rank reaches only once its own files are written, so
a checkpoint without it is partial (killed mid-save) and is ignored by resume
and deleted on the next save of that step.

A checkpoint resumes only on the same number of processes: the per-rank RNG
files and the ZeRO partitions are per rank. DeepSpeed can re-partition through
its "universal checkpoint" conversion (``ds_to_universal.py``), which orch does
not run; `load` says so when the world size differs.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from orchestrator.errors import Exit, OrchError
from orchestrator.faults import NO_FAULTS, Faults

MARKER = "COMPLETE"


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


def latest(root: Path) -> Optional[CheckpointInfo]:
    """The complete checkpoint with the highest step under ``root``, or None."""
    best = None
    if not root.is_dir():
        return None
    for d in root.iterdir():
        marker = d / MARKER
        if not (d.is_dir() and marker.is_file()):
            continue
        try:
            meta = json.loads(marker.read_text())
            info = CheckpointInfo(d, d.name, int(meta["step"]), int(meta["world_size"]), str(meta["strategy"]))
        except (ValueError, KeyError, OSError):
            continue  # a marker that is not ours / unreadable: not complete
        if best is None or info.step > best.step:
            best = info
    return best


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, root: Path, step: int, client_state: dict, rank: int, world: int, strategy: str,
         barrier: Callable[[], None], exclude_frozen: bool, faults: Faults = NO_FAULTS) -> Path:
    """Write checkpoint ``step`` on every rank; returns its folder. Collective: all ranks call it.

    ``exclude_frozen`` (lora/qlora) leaves the frozen base weights out: resume rebuilds
    them exactly as the first start did (same seed, or the same pretrained folder), so
    saving them would only cost disk (about 40 GiB per checkpoint for a 70B QLoRA job).
    ``faults``: the test seam (orchestrator/faults.py), called between the files and the marker.
    """
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
        tmp.write_text(json.dumps({"step": step, "world_size": world, "strategy": strategy}))
        tmp.replace(path / MARKER)
    barrier()
    return path


def load(engine, info: CheckpointInfo, rank: int, world: int, strict: bool) -> dict:
    """Load ``info`` into ``engine`` and restore this rank's RNG; returns the client state."""
    if info.world_size != world:
        raise CheckpointError(
            f"{info.path}: saved by {info.world_size} processes, this run has {world}; orch resumes a checkpoint "
            "only on the same number of processes (convert it with DeepSpeed's ds_to_universal.py to change it)"
        )
    # strict=False for lora/qlora: the frozen base weights were not saved (see save), and
    # bitsandbytes adds quant-state keys (absmax, quant_map, ...) that load_state_dict rejects.
    loaded, client = engine.load_checkpoint(str(info.path.parent), tag=info.tag, load_module_strict=strict,
                                            load_optimizer_states=True, load_lr_scheduler_states=True)
    if loaded is None:
        raise CheckpointError(f"{info.path}: DeepSpeed could not load this checkpoint")
    rng_file = info.path / f"rng_rank{rank}.pt"
    set_rng_state(torch.load(rng_file, weights_only=False))
    return client or {}
