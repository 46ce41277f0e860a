"""`orch submit` / `status` / `cancel` / `logs`: hand compiled jobs to Slurm, or run them here.

* ``orch status [JOBID | RUN_DIR]``: Slurm's state of a job and its run's progress (step / total,
  loss, eval loss, tokens/s, ETA, measured vs predicted peak; orchestrator/progress.py), found
  through the batch script orch wrote; a run folder alone for --local runs.

* ``orch submit JOB``: compile, create the log folder, ``sbatch --parsable``;
  prints the Slurm job id and the log path.
* ``--dry-run``: compile in memory and print the plan summary and the script;
  nothing is written or submitted.
* ``--local``: compile, then run the same trainer on this machine through orch's
  launcher (orchestrator/launch.py) with ``hardware.gpus_per_node`` ranks: GPU
  ranks when CUDA is there, else that many CPU processes (DeepSpeed picks its
  CPU accelerator by itself). A stop signal (Ctrl-C, SIGTERM, SIGUSR1) makes the
  ranks checkpoint and exit 75, and `orch submit` with them.
* An output dir that holds a run is refused before anything is submitted unless
  ``--resume`` or ``--restart`` says what to do with it (preflight.check_run_folder).

Secrets (WANDB_API_KEY, HF_TOKEN) are never written anywhere: sbatch passes the
submitting environment to the job (Slurm's default --export=ALL), and the local
launcher inherits it.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from orchestrator.compiler import Compiled
from orchestrator.errors import Exit, OrchError
from orchestrator.launch import LaunchSpec, launch
from orchestrator.spec import JobSpec


@dataclass(frozen=True)
class SubmitOptions:
    """What `orch submit` does with a compiled job."""

    dry_run: bool = False
    """Print the plan summary and the script; write and submit nothing."""
    local: bool = False
    """Train on this machine through orch's launcher instead of sbatch."""
    resume: bool = False
    """Continue the run in the output dir from its latest complete checkpoint (a Slurm requeue resumes by itself)."""
    restart: bool = False
    """Move the run in the output dir aside (the trainer does it when it starts) and train from step 0."""

    @property
    def run_flags(self) -> list[str]:
        """The trainer's flag for a run already in the output dir (the batch script's argument)."""
        return ["--resume"] if self.resume else ["--restart"] if self.restart else []


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise OrchError(f"{tool} not found on PATH: run on a Slurm login node, or use --local to train here",
                        Exit.SUBMIT_FAILED)
    return path


def _run_slurm(argv: list[str]) -> str:
    """Run a Slurm client; its error becomes one line."""
    _need(argv[0])
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        msg = " ".join((proc.stderr or proc.stdout).split()) or f"exit status {proc.returncode}"
        raise OrchError(f"{argv[0]} failed: {msg}", Exit.SUBMIT_FAILED)
    return proc.stdout


def plan_summary(compiled: Compiled) -> str:
    job: JobSpec = compiled.job
    t, hw = job.training, job.hardware
    return "\n".join([
        f"job:       {job.name} ({job.method}, {job.model.name})",
        f"strategy:  {compiled.strategy}",
        f"hardware:  {hw.nodes} node(s) x {hw.gpus_per_node} GPU(s) = {hw.world_size} ranks",
        f"batch:     {t.micro_batch_size} per GPU x {job.grad_accum()} accumulation x {hw.world_size} = {t.global_batch_size}",
        f"ds config: {compiled.files['ds_config']}",
        f"script:    {compiled.files['sbatch']}",
        f"job spec:  {compiled.files['job_yaml']}",
        f"logs:      {compiled.paths.log_dir}",
    ])


def submit(compiled: Compiled, options: SubmitOptions) -> int:
    """Submit ``compiled`` with sbatch, or as ``options`` say (print it, or train here)."""
    if options.dry_run:
        print(plan_summary(compiled))
        print()
        print(compiled.sbatch, end="")
        return Exit.OK
    preflight(compiled, options)
    if options.local:
        return run_local(compiled, options)
    from orchestrator import compiler

    _need("sbatch")
    compiler.write(compiled)
    Path(compiled.paths.log_dir).mkdir(parents=True, exist_ok=True)  # Slurm does not create it
    out = _run_slurm(sbatch_command(compiled, options))
    job_id = out.strip().split(";")[0]
    from orchestrator.slurm import log_file

    print(f"submitted job {job_id}")
    print(f"log: {log_file(compiled.job, compiled.paths, job_id)}")
    return Exit.OK


def preflight(compiled: Compiled, options: SubmitOptions) -> None:
    """The output dir is writable, has room for a checkpoint, and holds no run unless --resume or
    --restart says what to do with it: fail here, not after the queue wait."""
    from orchestrator import preflight as P

    out = compiled.job.output_dir()
    P.check_output_dir(out, P.checkpoint_bytes(compiled.job, compiled.strategy))
    P.check_run_folder(out, options.resume, options.restart)
    if options.resume:  # a checkpoint this run cannot continue (another global batch, ZeRO stage, ...)
        from orchestrator import checkpoint, levers

        job = compiled.job
        checkpoint.resume_point(out, compiled.strategy, levers.engine(job, compiled.strategy), job.hardware.world_size,
                                job.training.global_batch_size)


def sbatch_command(compiled: Compiled, options: SubmitOptions) -> list[str]:
    """sbatch's argv: the batch script takes --resume or --restart as its argument and passes it to
    the trainer (a requeued run passes --resume instead)."""
    return ["sbatch", "--parsable", str(compiled.files["sbatch"]), *options.run_flags]


def local_launch(compiled: Compiled, options: SubmitOptions, port: int) -> LaunchSpec:
    """orch's launcher for a one-node run here: one rank per hardware.gpus_per_node (GPU ranks with
    CUDA, else CPU processes)."""
    return LaunchSpec(
        nproc_per_node=compiled.job.hardware.gpus_per_node, module=compiled.paths.module, master_port=port,
        python=compiled.paths.python,
        args=("--job", str(compiled.files["job_yaml"]), "--ds-config", str(compiled.files["ds_config"]),
              *options.run_flags))


def run_local(compiled: Compiled, options: SubmitOptions) -> int:
    """Train here: the ranks run under orch's launcher in this process, so a stop signal to `orch
    submit` (Ctrl-C, kill) reaches them as a request to checkpoint. Returns Exit.REQUEUE when they
    stopped that way."""
    from orchestrator import compiler

    if compiled.job.hardware.nodes != 1:
        raise OrchError(f"--local runs on this one machine: set hardware.nodes=1 (got {compiled.job.hardware.nodes})",
                        Exit.BAD_SPEC)
    compiler.write(compiled)
    # A port per process id: two local runs do not collide, and no socket probing.
    code = launch(local_launch(compiled, options, 29500 + os.getpid() % 1000))
    if code == Exit.REQUEUE:  # the trainer said where it stopped and how to continue
        return Exit.REQUEUE
    if code != 0:
        raise OrchError(f"training failed (exit status {code}); see the output above", Exit.TRAIN_FAILED)
    return Exit.OK


def status(target: Optional[str]) -> int:
    """`squeue` of all this user's jobs; for a Slurm job id its state and its run's progress; for a run
    folder (a --local run, or a job Slurm has forgotten) the progress alone (orchestrator/progress.py)."""
    from orchestrator import progress as P

    if target is None:
        fmt = "%.18i %.9P %.40j %.8T %.10M %.6D %R"
        print(_run_slurm(["squeue", "-o", fmt, "-u", os.environ.get("USER") or str(os.getuid())]), end="")
        return Exit.OK
    if Path(target).is_dir():
        print(P.render_progress(P.read_progress(Path(target))))
        return Exit.OK
    if not re.fullmatch(r"\d+(_\d+)?", target):
        raise OrchError(f"{target!r} is neither a run folder nor a Slurm job id", Exit.BAD_SPEC)
    try:
        fields = _job_fields(target)
    except OrchError as exc:
        raise OrchError(f"job {target}: Slurm does not know it ({exc}); for a finished job give its run folder: "
                        "orch status RUN_DIR", exc.code) from None
    print(f"job {target} {fields.get('JobName', '?')}: {fields.get('JobState', '?')}, run time "
          f"{fields.get('RunTime', '?')} on {fields.get('NumNodes', '?')} node(s)")
    print(P.render_progress(P.read_progress(run_dir_of_job(target, fields))))
    return Exit.OK


def run_dir_of_job(job_id: str, fields: dict[str, str]) -> Path:
    """The output folder of a job orch submitted: the batch script (Slurm's Command) exports
    ORCH_JOB_YAML, the compiled job, whose training.output_dir is the run folder. Relative paths
    (`orch compile --portable`) are relative to the job's WorkDir."""
    from orchestrator.spec import SpecError, load_job

    workdir = Path(fields.get("WorkDir") or ".")
    script = workdir / fields.get("Command", "")
    try:
        text = script.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise OrchError(f"job {job_id}: cannot read its batch script {script} ({exc}); give the run folder: "
                        "orch status RUN_DIR", Exit.BAD_SPEC) from None
    line = next((x for x in text.splitlines() if x.startswith("export ORCH_JOB_YAML=")), None)
    if line is None:
        raise OrchError(f"job {job_id}: {script} was not written by orch (no ORCH_JOB_YAML line); give the run folder: "
                        "orch status RUN_DIR", Exit.BAD_SPEC)
    job_yaml = workdir / shlex.split(line.removeprefix("export "))[0].partition("=")[2]
    try:
        job = load_job(job_yaml, check_paths=False)
    except SpecError as exc:
        raise OrchError(f"job {job_id}: its compiled job cannot be read: {exc.problems[0]}", Exit.BAD_SPEC) from None
    return workdir / job.output_dir()


def cancel(job_id: str) -> int:
    _job_field(job_id, "JobState")  # scancel exits 0 for an unknown job id; scontrol does not
    _run_slurm(["scancel", job_id])
    print(f"cancelled {job_id}")
    return Exit.OK


def _job_fields(job_id: str) -> dict[str, str]:
    """The fields of `scontrol show job`. Path fields (StdOut, Command, ...) sit alone on their
    line, so a path with spaces is read whole; other fields are space-separated."""
    out = _run_slurm(["scontrol", "show", "job", job_id])
    fields: dict[str, str] = {}
    for line in out.splitlines():
        line = line.strip()
        name = line.partition("=")[0]
        if name in ("StdOut", "StdErr", "Command", "WorkDir"):
            fields[name] = line[len(name) + 1:]
            continue
        for token in line.split():
            key, sep, value = token.partition("=")
            if sep:
                fields.setdefault(key, value)
    return fields


def _job_field(job_id: str, field: str) -> str | None:
    """One field of `scontrol show job`."""
    return _job_fields(job_id).get(field)


def logs(job_id: str, follow: bool = False) -> int:
    """Print the job's log; ``follow`` keeps printing while the job is queued or running."""
    path = _job_field(job_id, "StdOut")
    if not path:
        raise OrchError(f"job {job_id}: Slurm reports no log path", Exit.ERROR)
    log = Path(path)
    if not log.exists():
        raise OrchError(f"job {job_id}: log {path} does not exist yet (job pending?)", Exit.ERROR)
    with log.open("r", errors="replace") as f:
        sys.stdout.write(f.read())
        while follow:
            chunk = f.read()
            if chunk:
                sys.stdout.write(chunk)
                sys.stdout.flush()
                continue
            state = _job_field(job_id, "JobState")
            if state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "SUSPENDED"):
                break
            time.sleep(1)
    return Exit.OK
