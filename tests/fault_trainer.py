"""The trainer with a fault injected (tests only), for tests that run it in a subprocess:

    python -m tests.fault_trainer --pause-in-save STEP --job JOB.yaml ...   # sleeps inside the save of STEP
    python -m tests.fault_trainer --oom-at-step STEP --job JOB.yaml ...     # CUDA out-of-memory in step STEP
    python -m tests.fault_trainer --kill-in-convert STEP --job JOB.yaml ... # kill -9 after the universal
                                                                            # conversion of STEP, before its marker

The remaining arguments go to the real trainer (``orchestrator.train.main``), which calls these
hooks at its test seams (orchestrator/faults.py). ``--pause-in-save`` prints
``fault_trainer: paused in save of step STEP`` on stderr before it sleeps, so the test knows when to
kill: after this rank's checkpoint files are written, before the COMPLETE marker.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import Optional, Sequence

from orchestrator import faults, train


class InjectedFaults(faults.Faults):
    def __init__(self, pause_in_save: Optional[int], oom_at_step: Optional[int], kill_in_convert: Optional[int]):
        self.pause_in_save = pause_in_save
        self.oom_at_step = oom_at_step
        self.kill_in_convert = kill_in_convert

    def in_step(self, step: int) -> None:
        if step == self.oom_at_step:
            import torch

            raise torch.cuda.OutOfMemoryError(f"fault_trainer: out of memory injected in step {step}")

    def in_save(self, step: int) -> None:
        if step == self.pause_in_save:
            print(f"fault_trainer: paused in save of step {step}", file=sys.stderr, flush=True)
            time.sleep(600)

    def in_convert(self, step: int) -> None:
        if step == self.kill_in_convert:
            print(f"fault_trainer: killed in the conversion of step {step}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.fault_trainer")
    p.add_argument("--pause-in-save", type=int, metavar="STEP")
    p.add_argument("--oom-at-step", type=int, metavar="STEP")
    p.add_argument("--kill-in-convert", type=int, metavar="STEP")
    args, trainer_argv = p.parse_known_args(argv)
    return train.main(trainer_argv, faults=InjectedFaults(args.pause_in_save, args.oom_at_step, args.kill_in_convert))


if __name__ == "__main__":
    sys.exit(main())
