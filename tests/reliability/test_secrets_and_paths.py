"""Secrets never reach written files; spec names cannot move writes outside the paths given.

Secrets: `orch compile` and a real short training run of jobs/tiny.yaml (1 process,
real wandb in offline mode, a checkpoint written) with WANDB_API_KEY, HF_TOKEN and
similar variables set to unique marker values; then every file written (compile
--out, the output dir, the working directory: wandb's offline run included) is
read as bytes and searched for each marker.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli_helpers import REPO_ROOT, run_orch
from tests.train_helpers import env as train_env

SECRET_VARS = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_TOKEN", "WANDB_PASSWORD")


def _all_files(*roots: Path) -> list[Path]:
    return [p for root in roots for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


def test_secrets_never_written(tmp_path: Path) -> None:
    markers = {var: f"orchsecret{secrets.token_hex(12)}" for var in SECRET_VARS}
    work = tmp_path / "work"
    work.mkdir()
    gen, out = tmp_path / "gen", tmp_path / "out"
    overrides = [f"data.paths=[{REPO_ROOT}/jobs/data/tiny.jsonl]", f"training.output_dir={out}",
                 "training.max_steps=4", "training.save_every=2", "logging.wandb_mode=offline", "logging.log_every=1"]
    compiled = run_orch("compile", REPO_ROOT / "jobs" / "tiny.yaml", *overrides, "--out", gen, cwd=work, env=markers)
    assert compiled.returncode == 0, compiled.stderr
    e = {**train_env(), **markers, "WANDB_MODE": "offline", "WANDB_DIR": str(out)}
    trained = subprocess.run([sys.executable, "-m", "orchestrator.train", "--job", str(REPO_ROOT / "jobs" / "tiny.yaml"),
                              *overrides], cwd=work, env=e, capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    files = _all_files(gen, out, work)
    names = {p.name for p in files}
    # the run really wrote what must be searched: configs, script, metrics, checkpoint, adapter, wandb offline run
    assert {"summary.json", "metrics.jsonl", "COMPLETE", "adapter_model.safetensors"} <= names, sorted(names)
    assert any(p.suffix == ".sbatch" for p in files) and any(p.suffix == ".json" and "ds_configs" in p.parts for p in files)
    assert any(p.suffix == ".wandb" for p in files), "wandb wrote no offline run: the log files were not searched"
    leaks = []
    for p in files:
        data = p.read_bytes()
        for var, marker in markers.items():
            for encoded in (marker.encode(), marker.encode("utf-16-le")):
                if encoded in data:
                    leaks.append(f"{var} in {p}")
    for var, marker in markers.items():  # the console output counts as a log too
        if marker in trained.stdout + trained.stderr + compiled.stdout + compiled.stderr:
            leaks.append(f"{var} in console output")
    assert not leaks, leaks


@pytest.mark.parametrize("name", ["../../x", "../escape", "/abs/olute", "a/../../b", "..", "./.hidden", "x\\..\\..\\y"])
def test_name_cannot_escape_out_dir(tmp_path: Path, name: str) -> None:
    work = tmp_path / "a" / "b" / "work"
    work.mkdir(parents=True)
    gen = work / "gen"
    before = {p for p in tmp_path.rglob("*")}
    proc = run_orch("compile", REPO_ROOT / "jobs" / "tiny.yaml", f"name={name}",
                    f"data.paths=[{REPO_ROOT}/jobs/data/tiny.jsonl]", "--out", gen, cwd=work)
    assert proc.returncode == 0, proc.stderr
    written = {p for p in tmp_path.rglob("*")} - before
    assert written, "compile wrote nothing"
    outside = [p for p in written if gen != p and gen not in p.parents]
    assert not outside, outside
    # the output dir template {name} takes the slug too: one path component under the default root
    gen_yaml = next(gen.glob("slurm/*.job.yaml")).read_text()
    out_line = next(l for l in gen_yaml.splitlines() if l.strip().startswith("output_dir:"))
    value = Path(out_line.split(":", 1)[1].strip())
    assert value.parent == work / "runs" and value.name not in ("", ".", ".."), out_line
