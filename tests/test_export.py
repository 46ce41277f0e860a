"""`orch export RUN_DIR --out DIR` (orchestrator/export.py) and the run folder's job.yaml it starts from."""

from __future__ import annotations

from pathlib import Path

import yaml

from orchestrator.compiler import RUN_JOB_FILE, write_run_job
from orchestrator.spec import load_job
from tests.train_helpers import tiny_job


def test_run_job_is_the_resolved_job_with_absolute_paths(tmp_path, monkeypatch):
    """write_run_job writes what the trainer trains: the concrete strategy, and paths that still
    point at the same files when read from another folder (orch export runs anywhere)."""
    monkeypatch.chdir(tmp_path)
    spec = tiny_job(tmp_path, "rel", strategy="auto", training={"output_dir": "runs/{name}"})
    data = yaml.safe_load(spec.read_text())
    data["data"]["paths"] = ["data.jsonl"]  # relative to the folder orch runs in
    spec.write_text(yaml.safe_dump(data))
    job = load_job(spec)

    path = write_run_job(job, "single_gpu")

    assert path == tmp_path / "runs" / "rel" / RUN_JOB_FILE
    assert sorted(p.name for p in path.parent.iterdir()) == [RUN_JOB_FILE]  # written atomically: no temp file left
    monkeypatch.chdir("/")
    back = load_job(path)
    assert back.strategy == "single_gpu"
    assert back.data.paths == [str(tmp_path / "data.jsonl")]
    assert Path(back.training.output_dir) == tmp_path / "runs" / "rel"
    assert back.model_dump(exclude={"strategy", "data", "training"}) == job.model_dump(exclude={"strategy", "data", "training"})
