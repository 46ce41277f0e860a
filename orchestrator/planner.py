"""Placeholder until the real planner is merged (the lead drops this file at merge).

Only what `orch compile` needs: a forced strategy passes through; "auto" is refused.
"""

from __future__ import annotations


class NoFitError(Exception):
    """No strategy fits the hardware (one-line message)."""


def resolve_strategy(job) -> str:
    if job.strategy != "auto":
        return job.strategy
    raise NoFitError("planner not merged yet")
