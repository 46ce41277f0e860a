"""`orch compile`: a job spec -> DeepSpeed JSON + Slurm script + resolved job spec.

Three files per job, named by the job's slug::

    <out>/ds_configs/<slug>.json     DeepSpeed config (concrete values)
    <out>/slurm/<slug>.sbatch        batch script (sbatch it from the repo root)
    <out>/slurm/<slug>.job.yaml      the resolved spec the trainer reads

Everything is built and checked in memory first; files are written only when
all three are ready, each through a temporary file and an atomic rename, so a
rejected spec writes nothing and a reader never sees half a file.

Two path modes:

* default: every path in the compiled job and the script is absolute, and the
  script runs the Python that ran `orch compile` (``sys.executable``). The
  script works from any directory, on any node that mounts the same paths.
* portable (``--portable``): paths stay relative to the directory orch runs
  in (the repo root), the script runs ``python3`` as found after the setup
  lines, and nothing of this machine appears in the output. The committed
  examples in ds_configs/ and slurm/ and the golden files are made this way, so
  any clone regenerates them byte for byte. sbatch them from that directory
  (Slurm starts the batch script in the submit directory).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from orchestrator import hub, planner
from orchestrator.deepspeed_config import build_ds_config
from orchestrator.slurm import SbatchPaths, render_sbatch
from orchestrator.spec import JobSpec, dump_job


@dataclass(frozen=True)
class CompileOptions:
    """How paths and the interpreter are written into the outputs."""

    portable: bool = False
    """Keep paths relative to the working directory and use `python3` (reproducible committed outputs)."""
    python: Optional[str] = None
    """Interpreter the batch script runs; default: sys.executable, or python3 when portable."""


@dataclass(frozen=True)
class Compiled:
    """The in-memory result of compiling one job (nothing written yet)."""

    job: JobSpec
    """The resolved job: concrete strategy, paths as written to the outputs."""
    strategy: str
    """The strategy the outputs were generated for."""
    ds_config: dict
    """DeepSpeed config."""
    sbatch: str
    """Batch script text."""
    paths: SbatchPaths
    """Paths as the script refers to them."""
    files: dict[str, Path]
    """'ds_config', 'sbatch', 'job_yaml' -> where the files go on this machine."""


def output_files(job: JobSpec, out_dir: Path) -> dict[str, Path]:
    slug = job.slug()
    return {
        "ds_config": out_dir / "ds_configs" / f"{slug}.json",
        "sbatch": out_dir / "slurm" / f"{slug}.sbatch",
        "job_yaml": out_dir / "slurm" / f"{slug}.job.yaml",
    }


def _path_for_output(path: str, portable: bool) -> str:
    """How a path from the spec (relative to the cwd) is written: absolute, or as is when portable."""
    if portable:
        return path
    return os.path.abspath(os.path.expanduser(path))


def resolve_job(job: JobSpec, strategy: str, portable: bool) -> JobSpec:
    """The job with a concrete strategy, {name} filled into output_dir and paths resolved (its knobs
    must be concrete already: planner.resolve)."""
    data = job.model_dump(mode="json")
    data["strategy"] = strategy
    conv = lambda p: _path_for_output(p, portable)  # noqa: E731
    d = job.data
    for key in ("paths", "eval_paths"):
        if getattr(d, key) is not None:
            data["data"][key] = [conv(p) for p in getattr(d, key)]
    for key in ("sources", "eval_sources"):
        for item in data["data"][key] or []:
            item["path"] = conv(item["path"])
    if hub.from_cache(job.model.name):
        # The trainer reads the very snapshot resolved here; --portable keeps the id for the cluster's own cache.
        data["model"]["name"] = job.model.name if portable else _path_for_output(str(job.model.folder()), False)
    elif not job.model.is_preset():
        data["model"]["name"] = conv(job.model.name)
    if job.model.tokenizer is not None:
        data["model"]["tokenizer"] = conv(job.model.tokenizer)
    if job.hardware.nvme_path is not None:
        data["hardware"]["nvme_path"] = conv(job.hardware.nvme_path)
    data["training"]["output_dir"] = conv(str(job.output_dir()))
    return JobSpec.model_validate(data)


def build(job: JobSpec, out_dir, options: CompileOptions = CompileOptions(),
          keep_zero_stage: Optional[int] = None) -> Compiled:
    """Resolve the strategy and the auto knobs, and render every output in memory (the compiled job and
    the DeepSpeed JSON carry the concrete micro batch and checkpointing: the trainer never sees auto).
    ``keep_zero_stage``: that of the checkpoint a ``--resume`` continues (planner.resolve).
    Raises planner.NoFitError."""
    strategy, concrete = planner.resolve(job, keep_zero_stage)
    resolved = resolve_job(concrete, strategy, options.portable)
    files = output_files(job, Path(out_dir))
    ds = build_ds_config(resolved, strategy, resolved.shape())

    def ref(p: Path) -> str:
        return os.path.relpath(p) if options.portable else os.path.abspath(p)

    python = options.python or ("python3" if options.portable else sys.executable)
    paths = SbatchPaths(
        job_yaml=ref(files["job_yaml"]),
        ds_config=ref(files["ds_config"]),
        log_dir=f"{resolved.training.output_dir}/logs",
        python=python,
    )
    script = render_sbatch(resolved, strategy, paths)
    return Compiled(resolved, strategy, ds, script, paths, files)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def ds_config_text(ds: dict) -> str:
    return json.dumps(ds, indent=2, sort_keys=False) + "\n"


def write(compiled: Compiled) -> list[Path]:
    texts = {
        "ds_config": ds_config_text(compiled.ds_config),
        "sbatch": compiled.sbatch,
        "job_yaml": dump_job(compiled.job),
    }
    written = []
    for key in ("ds_config", "job_yaml", "sbatch"):
        _write_atomic(compiled.files[key], texts[key])
        written.append(compiled.files[key])
    return written


RUN_JOB_FILE = "job.yaml"
"""The resolved job a run trains, written into its output dir when the trainer starts (`write_run_job`)."""


def write_run_job(job: JobSpec, strategy: str) -> Path:
    """Write ``job`` as the run trains it -- concrete strategy, absolute paths -- to
    ``<output_dir>/job.yaml`` atomically; return the path. The run folder then says which job
    made it, for tools that start from the folder alone (`orch export RUN_DIR`)."""
    resolved = resolve_job(job, strategy, portable=False)
    path = resolved.output_dir() / RUN_JOB_FILE
    _write_atomic(path, dump_job(resolved))
    return path


def compile_job(job: JobSpec, out_dir, options: CompileOptions = CompileOptions()) -> list[Path]:
    """Write the DeepSpeed JSON, the batch script and the compiled job; return their paths."""
    return write(build(job, Path(out_dir), options))

