"""The trainer's entry point: what every rank runs (``python -m orchestrator.train --job JOB.yaml``,
or ``orch train JOB``).

`add_arguments` defines the trainer's flags once, for both. `run` reads and resolves the job
(torch-free: the planner picks what ``auto`` leaves open), checks the output dir, then runs the
recipe (orchestrator/recipe.py: setup -> train -> save -> report) and turns its errors into one
line and an exit code.

Exit codes (orchestrator.errors.Exit): OK (also for --resume of a finished run,
which is left as it is); BAD_SPEC for a bad spec, argument, data or model folder,
or an output dir holding a run without --resume/--restart; NO_FIT when strategy
auto finds nothing; TRAIN_FAILED (runtime out-of-memory included, with predicted
vs used); REQUEUE after a checkpoint written on a stop signal (SIGTERM, SIGINT,
SIGUSR1: orchestrator/stop.py) -- the Slurm script requeues on it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

from orchestrator.errors import Exit, OrchError, print_error
from orchestrator.faults import NO_FAULTS, Faults
from orchestrator.stop import StopRequest


@dataclass(frozen=True)
class TrainOptions:
    """What the trainer was asked to do (its command line)."""

    job: str
    """The job spec: a compiled job YAML, or a spec (auto values are resolved like `orch compile` does)."""
    overrides: tuple[str, ...] = ()
    """key=value spec overrides."""
    ds_config: Optional[str] = None
    """A compiled DeepSpeed JSON; None builds the config from the job."""
    resume: bool = False
    """Continue the run in the output dir from its latest complete checkpoint."""
    restart: bool = False
    """Move the run in the output dir aside (into its previous/ folder) and train from step 0."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TrainOptions":
        return cls(job=args.job, overrides=tuple(args.overrides), ds_config=args.ds_config, resume=args.resume,
                   restart=args.restart)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The trainer's flags (all but the job file, which `orch train` takes as its first argument and
    the launched module as ``--job``)."""
    p.add_argument("--ds-config", help="DeepSpeed JSON (default: built from the job's plan)")
    add_run_folder_arguments(p)
    # launchers that follow DeepSpeed's convention append --local_rank=N; LOCAL_RANK says the same
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def add_run_folder_arguments(p: argparse.ArgumentParser) -> None:
    """What to do with a run already in the output dir (without either flag, such a dir is refused:
    preflight.check_run_folder). `orch submit` takes them too and passes them on."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true",
                       help="continue the run in the output dir from its latest complete checkpoint")
    group.add_argument("--restart", action="store_true",
                       help="move the run in the output dir aside (to <output_dir>/previous/<time>/) and start afresh")


def module_parser() -> argparse.ArgumentParser:
    """``python -m orchestrator.train``'s command line: ``--job JOB`` and `orch train`'s flags."""
    p = argparse.ArgumentParser(prog="python -m orchestrator.train", description="orch trainer (one rank)")
    p.add_argument("--job", required=True, help="compiled job YAML")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="spec overrides")
    add_arguments(p)
    return p


def resolve_job(options: TrainOptions):
    """The job to train and its strategy, every auto value resolved; the output dir checked here too
    (the job may run on a node that sees another file system than the submitter, and after another
    run wrote into it): room for a checkpoint, and a run already there only with --resume or --restart."""
    from orchestrator import planner, preflight
    from orchestrator.checkpoint import kept_zero_stage
    from orchestrator.spec import load_job

    job = load_job(options.job, list(options.overrides), for_training=True)
    strategy = job.strategy
    if strategy == "auto" or not job.knobs_resolved():
        # `orch train JOB` on a spec: choose like `orch compile` does (a compiled job has no auto left)
        strategy, job = planner.resolve(job, kept_zero_stage(job.output_dir()) if options.resume else None)
    try:
        preflight.check_output_dir(job.output_dir(), preflight.checkpoint_bytes(job, strategy))
    except preflight.PreflightError as exc:
        # Here the job is already running: the spec's output dir is what is wrong, not a submit.
        raise OrchError(str(exc), Exit.BAD_SPEC) from None
    preflight.check_run_folder(job.output_dir(), options.resume, options.restart)
    return job, strategy


def run(options: TrainOptions, faults: Faults = NO_FAULTS) -> int:
    """Train ``options.job`` on this rank; returns the exit code. ``faults``: test seams
    (orchestrator/faults.py; only tests/fault_trainer.py passes others than the default)."""
    # First: from here on a stop signal asks for a checkpoint at the next step boundary (it used to
    # kill the process, or raise KeyboardInterrupt, before the training loop was reached).
    stop = StopRequest.install()
    try:
        job, strategy = resolve_job(options)
    except OrchError as exc:
        print_error(exc)
        return exc.code
    # before transformers and datasets are imported: they read these once
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from orchestrator import recipe

    rank_info = recipe.RankInfo.from_environment()
    if options.restart and rank_info.is_main:
        from orchestrator.preflight import move_run_aside

        moved = move_run_aside(job.output_dir(), datetime.datetime.now(datetime.timezone.utc))
        if moved is not None:
            print(f"orch: --restart: moved the previous run to {moved}", file=sys.stderr)
    try:
        recipe.recipe(job, strategy, rank_info, stop, options.ds_config, options.resume, faults)
        return Exit.OK
    except OrchError as exc:
        if exc.code == Exit.REQUEUE:  # a stop signal, answered: not an error
            if rank_info.is_main:
                print(f"orch: {exc}", file=sys.stderr)
            return exc.code
        print_error(exc)
        if exc.code == Exit.TRAIN_FAILED and rank_info.world_size > 1:
            # the other ranks may be blocked in a collective: leave now (the
            # launcher stops them) instead of hanging in destroy_process_group
            sys.stderr.flush()
            sys.stdout.flush()
            os._exit(exc.code)
        return exc.code
    finally:
        recipe.cleanup()


def main(argv: Optional[Sequence[str]] = None, faults: Faults = NO_FAULTS) -> int:
    args = module_parser().parse_intermixed_args(argv)  # overrides before or after the options
    return run(TrainOptions.from_args(args), faults)


if __name__ == "__main__":
    sys.exit(main())
