"""Test seams: the points in a training run where a test can make a fault happen at a known moment.

The trainer calls the hooks of the `Faults` it is given (`orchestrator.train.main(argv, faults)`);
the default, `NO_FAULTS`, does nothing, and product code never builds another. Tests that need a
fault in a trainer running in a subprocess (a kill -9 in the middle of a checkpoint write, a CUDA
out-of-memory error on a machine without a GPU) start it through ``tests/fault_trainer.py``, which
passes its own `Faults` to the same `main`.
"""

from __future__ import annotations


class Faults:
    """Hooks called by the trainer; these defaults do nothing."""

    def in_step(self, step: int) -> None:
        """Called inside optimizer step ``step`` (1-based), before its first micro batch, where a CUDA
        out-of-memory error would be caught."""

    def in_save(self, step: int) -> None:
        """Called inside the checkpoint save of ``step`` on every rank, after this rank's files are
        written and before the COMPLETE marker."""

    def in_convert(self, step: int) -> None:
        """Called on rank 0 after DeepSpeed's universal conversion of checkpoint ``step`` finished and
        before its COMPLETE marker (checkpoint.to_universal)."""


NO_FAULTS = Faults()
