"""`orch`: plan, compile and launch finetuning jobs.

Each subcommand imports only what it needs, so `orch plan` never imports torch (orchestrator.train,
whose flags `orch train` takes, imports the torch side only when it trains).
Errors are one line on stderr with a named exit code (orchestrator.errors); `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import sys
from typing import Callable, Optional, Sequence

from orchestrator import train
from orchestrator.errors import Exit, OrchError, format_error, print_error


EPILOG = """\
examples:
  orch plan jobs/llama70b.yaml                            # will it fit? which strategy?
  orch plan jobs/llama70b.yaml hardware.gpus_per_node=4 training.micro_batch_size=2
  orch compile jobs/llama8b_full_2x80.yaml --out build/   # write build/ds_configs/, build/slurm/
  orch submit jobs/tiny.yaml --local --out runs/demo      # train here (CPU or local GPUs)
  orch submit jobs/llama70b.yaml --out runs/llama70b      # sbatch on a Slurm cluster
  orch export runs/tiny --out runs/tiny-hf                # the demo run as a Hugging Face model folder

Overrides: any spec field as dotted.key=value after the job file, before or after
options; values are YAML (4 is a number, true a boolean, [a, b] a list) and are
validated like the file.
exit codes: 0 ok, 1 unexpected error, 2 bad spec or usage, 3 nothing fits,
            4 submit failed, 5 training failed.
"""


def _job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", help="job spec, e.g. jobs/llama70b.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="spec overrides, e.g. training.micro_batch_size=4")


def _compile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=".", help="folder that receives ds_configs/ and slurm/ (default: current folder)")
    p.add_argument("--portable", action="store_true",
                   help="keep paths relative to the current folder and run python3 (reproducible outputs, e.g. the committed examples)")
    p.add_argument("--python", default=None, help="Python the batch script runs (default: this orch's interpreter; python3 with --portable)")


def _load(args: argparse.Namespace, for_training: bool = False):
    from orchestrator.spec import load_job

    warnings: list[str] = []
    job = load_job(args.job, args.overrides, for_training=for_training, warnings=warnings)
    for line in warnings:
        print(f"orch: warning: {line}", file=sys.stderr)
    return job


def cmd_validate(args: argparse.Namespace) -> int:
    job = _load(args)
    print(f"{args.job}: ok ({job.name!r}, {job.method}, {job.model.name}, "
          f"{job.hardware.nodes}x{job.hardware.gpus_per_node} GPUs, strategy {job.strategy})")
    return Exit.OK


def cmd_schema(args: argparse.Namespace) -> int:
    from orchestrator.spec import json_schema

    print(json.dumps(json_schema(), indent=2))
    return Exit.OK


def cmd_models(args: argparse.Namespace) -> int:
    from orchestrator.catalog import format_params, model_table

    rows = model_table()
    if args.json:
        print(json.dumps([{"name": r.name, "params": r.params, **r.shape.__dict__} for r in rows], indent=2))
        return Exit.OK
    print(f"{'preset':<12} {'family':<11} {'params':>8} {'layers':>6} {'hidden':>6} {'ffn':>6} {'heads':>5} {'kv':>3} "
          f"{'hdim':>4} {'vocab':>7} tied {'window':>6}")
    for r in rows:
        s = r.shape
        window = f"{s.sliding_window}" if s.sliding_window else "-"
        print(f"{r.name:<12} {s.model_type:<11} {format_params(r.params):>8} {s.num_hidden_layers:>6} {s.hidden_size:>6} "
              f"{s.intermediate_size:>6} {s.num_attention_heads:>5} {s.num_key_value_heads:>3} {s.head_dim_:>4} "
              f"{s.vocab_size:>7} {'yes' if s.tie_word_embeddings else 'no':<4} {window:>6}")
    return Exit.OK


def cmd_gpus(args: argparse.Namespace) -> int:
    from orchestrator.catalog import GPUS

    print(f"{'gpu':<11} {'memory':>10} {'bf16':>5} {'16-bit TFLOP/s':>15}")
    for name, g in GPUS.items():
        print(f"{name:<11} {g.memory_mib / 1024:>7.1f} GiB {'yes' if g.bf16 else 'no':>5} {g.peak_tflops:>15.0f}")
    return Exit.OK


def cmd_plan(args: argparse.Namespace) -> int:
    from orchestrator import planner

    job = _load(args)
    result = planner.plan(job)
    if args.json:
        print(json.dumps(planner.plan_json(job, result), indent=2))
    else:
        print(planner.render_table(job, result))
    return Exit.OK if result.chosen else Exit.NO_FIT


def _compile(job, args: argparse.Namespace, keep_zero_stage: Optional[int] = None):
    """`compile`'s and `submit`'s outputs in memory (nothing written); no fit names the job file."""
    from orchestrator import compiler, planner

    options = compiler.CompileOptions(portable=args.portable, python=args.python)
    try:
        return compiler.build(job, args.out, options, keep_zero_stage)
    except planner.NoFitError as exc:
        raise planner.NoFitError(f"{args.job}: no strategy fits: {exc}") from None


def cmd_compile(args: argparse.Namespace) -> int:
    from orchestrator import compiler

    job = _load(args)
    for path in compiler.write(_compile(job, args)):
        print(f"wrote {path}")
    return Exit.OK


def cmd_submit(args: argparse.Namespace) -> int:
    from orchestrator import submit

    job = _load(args, for_training=not args.dry_run)
    options = submit.SubmitOptions(dry_run=args.dry_run, local=args.local, resume=args.resume, restart=args.restart)
    keep = None
    if args.resume:  # strategy auto keeps the ZeRO stage of the checkpoint it continues
        from orchestrator.checkpoint import kept_zero_stage

        keep = kept_zero_stage(job.output_dir())
    return submit.submit(_compile(job, args, keep), options)


def cmd_train(args: argparse.Namespace) -> int:
    return train.run(train.TrainOptions.from_args(args))


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from orchestrator import export

    if args.max_shard_mb <= 0:
        raise OrchError(f"--max-shard-mb: got {args.max_shard_mb}; must be > 0", Exit.BAD_SPEC)
    result = export.export_run(Path(args.run_dir), Path(args.out), max_shard_bytes=int(args.max_shard_mb * 10**6),
                               which=args.checkpoint)
    print(export.render(result))
    return Exit.OK


def cmd_status(args: argparse.Namespace) -> int:
    from orchestrator import submit

    return submit.status(args.job_id)


def cmd_cancel(args: argparse.Namespace) -> int:
    from orchestrator import submit

    return submit.cancel(args.job_id)


def cmd_logs(args: argparse.Namespace) -> int:
    from orchestrator import submit

    return submit.logs(args.job_id, follow=args.follow)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orch",
        description="Plan, compile and launch LLM finetuning jobs (QLoRA, LoRA, full; 1 GPU to many nodes).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], help_: str, example: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_, epilog=f"example:\n  {example}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func)
        return p

    p = add("validate", cmd_validate, "check a job spec and exit", "orch validate jobs/llama70b.yaml training.lr=1e-4")
    _job_args(p)
    add("schema", cmd_schema, "print the JSON Schema of job specs (for editor completion)", "orch schema > orch-job.schema.json")
    p = add("models", cmd_models, "list built-in model presets with their shapes", "orch models --json")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add("gpus", cmd_gpus, "list known GPU models (hardware.gpu)", "orch gpus")

    p = add("plan", cmd_plan, "estimate per-GPU memory for every strategy and pick the fastest that fits (no torch, no download)",
            "orch plan jobs/llama70b.yaml hardware.gpus_per_node=4 --json")
    _job_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")

    p = add("compile", cmd_compile, "write the DeepSpeed config and the Slurm script for the chosen strategy",
            "orch compile jobs/llama8b_full_2x80.yaml --out build/")
    _job_args(p)
    _compile_args(p)

    p = add("submit", cmd_submit, "compile, then submit with sbatch (or train here with --local)",
            "orch submit jobs/tiny.yaml --local --out runs/demo")
    _job_args(p)
    _compile_args(p)
    p.add_argument("--dry-run", action="store_true", help="print the plan summary and the script, submit nothing")
    p.add_argument("--local", action="store_true", help="run the trainer on this machine through orch's launcher (GPUs if present, else CPU)")
    train.add_run_folder_arguments(p)

    p = add("train", cmd_train, "run the trainer in this process (what the launcher runs on each rank)",
            "orch train slurm/tiny.job.yaml --ds-config ds_configs/tiny.json")
    _job_args(p)
    train.add_arguments(p)

    p = add("export", cmd_export, "write a run's complete checkpoint (the latest, the best eval's, or a named step) as a "
            "Hugging Face model folder (LoRA/QLoRA merged into the base; no orch or PEFT needed to load it)",
            "orch export runs/tiny --out runs/tiny-hf")
    p.add_argument("run_dir", help="the run's output dir (training.output_dir), holding job.yaml and checkpoints/")
    p.add_argument("--out", required=True, help="new folder to write (must not exist, or be empty)")
    p.add_argument("--checkpoint", default="latest", metavar="latest|best|stepNNNNNNNN",
                   help="which complete checkpoint: the latest (default), the best eval's (summary.json's best_checkpoint), "
                   "or a step's folder under checkpoints/")
    p.add_argument("--max-shard-mb", type=float, default=5000,
                   help="largest safetensors file in MB (10^6 bytes; default 5000); a larger single tensor gets its own")

    p = add("status", cmd_status, "show Slurm jobs, or one job's progress: step / total, loss, eval loss, tokens/s, "
            "ETA, measured vs predicted peak", "orch status")
    p.add_argument("job_id", nargs="?", metavar="JOBID|RUN_DIR",
                   help="a Slurm job id, or a run's output folder (training.output_dir; for --local runs); "
                        "default: squeue of all your jobs")
    p = add("cancel", cmd_cancel, "cancel a Slurm job", "orch cancel 1234")
    p.add_argument("job_id", help="Slurm job id")
    p = add("logs", cmd_logs, "print a submitted job's log", "orch logs 1234 --follow")
    p.add_argument("job_id", help="Slurm job id")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing as the log grows")
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """``parser.parse_args``, with overrides also after options (`orch plan JOB --json k=v`).

    argparse fills a positional list only from the first run of positionals, and its
    parse_intermixed_args refuses parsers with subcommands; so the arguments argparse
    leaves over that are not options (an override cannot start with '-') go after the
    overrides it took, in the order given.
    """
    args, rest = parser.parse_known_args(argv)
    if hasattr(args, "overrides"):
        args.overrides += [a for a in rest if not a.startswith("-")]
        rest = [a for a in rest if a.startswith("-")]
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # here, not at exit: a closed pipe must raise inside this try
        return code
    except BrokenPipeError:
        # The reader went away (`orch plan JOB | head -2`): stop quietly. stdout is pointed at
        # /dev/null so the interpreter's own flush at exit cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return Exit.BROKEN_PIPE


def _stdout_closed() -> bool:
    """True when stdout is a pipe whose reader has gone (`| head` after its lines): the write end
    then polls POLLERR. A BrokenPipeError from anything else (a socket, a child's pipe) is not ours
    to hide."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no real file behind stdout, or no poll() here
        return False


def _main(argv: Optional[Sequence[str]]) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return Exit.BAD_SPEC
    try:
        return int(args.func(args))
    except OrchError as exc:
        if args.debug:
            raise
        print_error(exc)
        return int(exc.code)
    except KeyboardInterrupt:
        print("orch: interrupted", file=sys.stderr)
        return Exit.INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the one place that turns bugs into one line
        if isinstance(exc, BrokenPipeError) and _stdout_closed():
            raise  # the reader of stdout went away: main() stops quietly (any other broken pipe is an error)
        if args.debug:
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(format_error(f"{type(exc).__name__}: {first} (run with --debug for the traceback)"), file=sys.stderr)
        return Exit.ERROR


if __name__ == "__main__":
    sys.exit(main())
