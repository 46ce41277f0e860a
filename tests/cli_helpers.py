"""Run the `orch` CLI of the checkout under test in a subprocess.

The venv's `orch` console script imports whatever checkout was installed
(editable /work/main), so tests run `python -m orchestrator.cli` with
PYTHONPATH set to the repo root that holds *this* file instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional, Union

REPO_ROOT = Path(__file__).resolve().parent.parent


def orch_env(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    """The environment for a subprocess that must import this checkout's orchestrator."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONIOENCODING", "utf-8")
    if extra:
        env.update(extra)
    return env


def run_orch(*args: Union[str, Path], cwd: Union[str, Path, None] = None, timeout: float = 120,
             env: Optional[dict[str, str]] = None) -> subprocess.CompletedProcess:
    """`orch ARGS...` run from ``cwd`` (default: the repo root); text output, never raises on exit code."""
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *map(str, args)],
        cwd=str(cwd or REPO_ROOT),
        env=orch_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
