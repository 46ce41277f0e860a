"""Errors the user sees and orch's exit codes: one table for the CLI, the trainer and the batch script.

An expected failure is an `OrchError` (or a subclass: `spec.SpecError`, `planner.NoFitError`,
`data.DataError`, ...) that carries its exit code. Whoever ends the process -- `orch`'s main, the
trainer's `run` -- prints it with `print_error` and exits with ``exc.code``. The message is one line
per problem; a spec error may list several, and each line gets the ``orch: error:`` prefix.
"""

from __future__ import annotations

import enum
import sys
from typing import TextIO


class Exit(enum.IntEnum):
    """orch's exit codes (the process exit status of `orch` and of every trainer rank)."""

    OK = 0
    ERROR = 1
    """An unexpected failure (a bug, or a library error); `orch --debug` shows the traceback."""
    BAD_SPEC = 2
    """The job spec, an override, a command-line argument, the data or the model folder is wrong."""
    NO_FIT = 3
    """No strategy fits the job on its hardware."""
    SUBMIT_FAILED = 4
    """sbatch (or the local launcher) refused or failed, or the environment cannot run the job."""
    TRAIN_FAILED = 5
    """The trainer stopped with an error (a runtime out-of-memory included)."""
    REQUEUE = 75
    """The trainer wrote a checkpoint after a stop signal (SIGUSR1/SIGTERM) and exited: requeue it and
    resume (EX_TEMPFAIL). The generated batch script requeues the Slurm job on this code."""
    INTERRUPTED = 130
    """Stopped with Ctrl-C (128 + SIGINT)."""
    BROKEN_PIPE = 141
    """The reader of stdout went away (`orch models | head`): 128 + SIGPIPE, as a shell reports it."""


class OrchError(Exception):
    """An expected failure: printed without a traceback, one line per problem; exits with ``code``.

    Subclasses set their usual code as a class attribute; a raise site may give another.
    """

    code: Exit = Exit.ERROR

    def __init__(self, message: str, code: Exit | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


def format_error(message: str) -> str:
    """``message`` with ``orch: error: `` before each of its lines."""
    return "\n".join(f"orch: error: {line}" for line in message.splitlines() or [""])


def print_error(exc: BaseException, file: TextIO | None = None) -> None:
    """Print ``exc`` the way every orch error is printed (stderr by default)."""
    print(format_error(str(exc)), file=file or sys.stderr)
