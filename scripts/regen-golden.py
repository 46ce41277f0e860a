#!/usr/bin/env python3
"""Regenerate the golden files (tests/golden/) and the committed example outputs
(ds_configs/, slurm/ for every jobs/*.yaml), all in portable mode from the repo root.

    PYTHONPATH=. .venv/bin/python scripts/regen-golden.py

Review the diff before committing: a golden changes only when the generator's
output is meant to change. Jobs whose strategy is "auto" need the planner; if it
cannot resolve one, that job is reported and skipped (exit status 1).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
os.chdir(REPO)

from golden_cases import CASES  # noqa: E402

from orchestrator import compiler, planner  # noqa: E402
from orchestrator.compiler import CompileOptions  # noqa: E402
from orchestrator.spec import dump_job, load_job  # noqa: E402

PORTABLE = CompileOptions(portable=True)


def main() -> int:
    golden = REPO / "tests" / "golden"
    golden.mkdir(parents=True, exist_ok=True)
    for name, job_file, overrides in CASES:
        c = compiler.build(load_job(job_file, overrides), ".", PORTABLE)
        (golden / f"{name}.json").write_text(compiler.ds_config_text(c.ds_config))
        (golden / f"{name}.sbatch").write_text(c.sbatch)
        (golden / f"{name}.job.yaml").write_text(dump_job(c.job))
        print(f"golden {name}")
    failed = 0
    for job_file in sorted(Path("jobs").glob("*.yaml")):
        try:
            for path in compiler.compile_job(load_job(job_file), ".", PORTABLE):
                print(f"example {path}")
        except planner.NoFitError as exc:
            print(f"SKIPPED {job_file}: {exc}", file=sys.stderr)
            failed = 1
    return failed


if __name__ == "__main__":
    sys.exit(main())
