"""Stop signals: what ends a run early, and how the trainer hears of it.

SIGTERM (Slurm at the time limit and on preemption, ``kill``, ``kill -- -PGID``), SIGINT (Ctrl-C)
and SIGUSR1 (Slurm's warning before the time limit, ``--signal=B:USR1@...``) all mean the same to
orch: write a checkpoint at the next step boundary and exit Exit.REQUEUE (75), "checkpoint written,
run me again with --resume". Ctrl-C gets the same answer as the others because what it leaves
behind is the same: a complete checkpoint that --resume continues from. orch's launcher
(orchestrator/launch.py) forwards these signals to its ranks instead of killing them.

Torch-free: the trainer installs the handler first thing, before its heavy imports.
"""

from __future__ import annotations

import signal
from typing import Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopRequest:
    """Whether a stop signal has arrived in this process. Handlers may run several times (a signal
    sent to the process group and forwarded by the launcher arrives twice): only the first counts."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        """The first stop signal received, or None."""

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def handle(self, signum: int, frame=None) -> None:  # noqa: ARG002 - a signal handler's signature
        if self.signum is None:
            self.signum = signum

    @classmethod
    def install(cls) -> "StopRequest":
        """A StopRequest that is the handler of every stop signal of this process."""
        stop = cls()
        for sig in STOP_SIGNALS:
            signal.signal(sig, stop.handle)
        return stop


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
