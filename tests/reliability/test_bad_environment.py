"""Bad environment: each problem is a one-line error with a non-zero exit code,
before anything is submitted or trained, and nothing is written for it.

Real `orch` subprocesses and the real trainer. Already proven elsewhere (not
repeated here): sbatch rejecting the job -> tests/test_slurm_cli.py::
test_sbatch_rejection_is_one_line_exit_4 (real sbatch, local Slurm).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator import cli, planner, preflight, spec
from orchestrator.catalog import GIB
from orchestrator.errors import Exit
from tests.cli_helpers import REPO_ROOT, run_orch
from tests.train_helpers import env as train_env
from tests.train_helpers import tiny_job

TINY = REPO_ROOT / "jobs" / "tiny.yaml"


def _one_line_error(proc: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("orch: error:"), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def _submit(tmp_path: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_orch("submit", TINY, "strategy=single_gpu", f"training.output_dir={tmp_path}/run", *overrides,
                    "--out", tmp_path / "gen", env=env)


def test_missing_data_file(tmp_path: Path) -> None:
    proc = _submit(tmp_path, f"data.paths=[{tmp_path}/gone.jsonl]")
    _one_line_error(proc, 2, "data.paths.0", "gone.jsonl", "does not exist")
    assert _files(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 file; CI runs the tests as a normal user")
def test_unreadable_data_file(tmp_path: Path) -> None:
    data = tmp_path / "secret.jsonl"
    shutil.copy(REPO_ROOT / "jobs" / "data" / "tiny.jsonl", data)
    data.chmod(0)
    proc = _submit(tmp_path, f"data.paths=[{data}]")
    _one_line_error(proc, 2, "data.paths.0", "cannot read")
    assert _files(tmp_path / "gen") == []


def _data_case(tmp_path: Path, kind: str) -> tuple[list[str], tuple[str, ...]]:
    """Overrides that point the tiny job at bad data of one kind, and what the error must name."""
    if kind == "empty_file":
        (tmp_path / "empty.jsonl").write_text("")
        return [f"data.paths=[{tmp_path}/empty.jsonl]"], ("data.paths.0", "has no rows")
    if kind == "chat_on_text_rows":  # jobs/data/tiny.jsonl holds {"text": ...} rows
        return ["data.format=chat"], ("data.format", "format 'chat' needs 'messages'", "has keys text")
    if kind == "alpaca_without_output":
        (tmp_path / "a.jsonl").write_text(json.dumps({"instruction": "add", "input": "2 and 3"}) + "\n")
        return [f"data.paths=[{tmp_path}/a.jsonl]", "data.format=alpaca"], ("data.format", "'output'")
    if kind == "folder_not_a_dataset":
        (tmp_path / "shards").mkdir()
        shutil.copy(REPO_ROOT / "jobs" / "data" / "tiny.jsonl", tmp_path / "shards" / "part-0.jsonl")
        return [f"data.paths=[{tmp_path}/shards]"], ("data.paths.0", "not a data set saved with save_to_disk")
    assert kind == "unknown_lora_target"
    return ["method=lora", "lora.target_modules=[q_proj, qkv_proj]"], ("lora.target_modules", "'qkv_proj' is not a linear layer")


@pytest.mark.parametrize("kind", ["empty_file", "chat_on_text_rows", "alpaca_without_output", "folder_not_a_dataset",
                                  "unknown_lora_target"])
def test_bad_data_refused_by_submit_before_sbatch(tmp_path: Path, kind: str, capsys: pytest.CaptureFixture) -> None:
    """Bug fixed: `orch submit` accepted these and only the trainer refused them, after the queue wait
    (an empty file ended in `StopIteration:`). Now submit refuses them (exit 2) and writes nothing; so
    does the trainer's entry point (in-process here), which loads the spec through the same checks."""
    from orchestrator import train

    overrides, needles = _data_case(tmp_path, kind)
    _one_line_error(_submit(tmp_path, *overrides), 2, *needles)
    assert _files(tmp_path / "gen") == [] and not (tmp_path / "run").exists()
    job = tiny_job(tmp_path, "t", training={"output_dir": str(tmp_path / "trainer_run")})
    assert train.run(train.TrainOptions(job=str(job), overrides=tuple(overrides))) == Exit.BAD_SPEC == 2
    err = capsys.readouterr().err
    assert all(n in err for n in needles), err
    assert not (tmp_path / "trainer_run").exists()


def test_model_folder_without_config_json(tmp_path: Path) -> None:
    folder = tmp_path / "mymodel"
    folder.mkdir()
    (folder / "tokenizer.json").write_text("{}")
    proc = _submit(tmp_path, f"model.name={folder}")
    _one_line_error(proc, 2, "model.name", "config.json")
    assert _files(tmp_path / "gen") == [] and not (tmp_path / "run").exists()


def test_no_sbatch_on_path(tmp_path: Path) -> None:
    # The interpreter is called by its absolute path; PATH holds no Slurm client.
    empty = tmp_path / "bin"
    empty.mkdir()
    proc = _submit(tmp_path, env={"PATH": str(empty)})
    _one_line_error(proc, 4, "sbatch not found on PATH")


def test_output_dir_cannot_be_created_submit_and_trainer(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    proc = _submit(tmp_path, f"training.output_dir={blocker}/run")
    _one_line_error(proc, 4, "training.output_dir", "is not a folder")
    assert _files(tmp_path / "gen") == []
    # the trainer checks again before loading anything (the job may run on another node)
    job = tiny_job(tmp_path, "t", training={"output_dir": f"{blocker}/run"})
    trained = subprocess.run([sys.executable, "-m", "orchestrator.train", "--job", str(job)], cwd=tmp_path,
                             env=train_env(), capture_output=True, text=True, timeout=300)
    _one_line_error(trained, 2, "training.output_dir", "is not a folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a chmod 500 folder; CI runs the tests as a normal user")
def test_output_dir_not_writable(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        proc = _submit(tmp_path, f"training.output_dir={ro}/run")
        _one_line_error(proc, 4, "training.output_dir", "not writable")
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize("room", ["one byte short", "just enough"])
def test_output_dir_without_room_for_a_checkpoint(tmp_path: Path, monkeypatch, capsys, room: str) -> None:
    monkeypatch.chdir(REPO_ROOT)
    job_file = REPO_ROOT / "jobs" / "llama13b_full_offload.yaml"
    job = spec.load_job(job_file, check_paths=False)
    strategy, resolved = planner.resolve(job)
    need = preflight.checkpoint_bytes(resolved, strategy)
    free = need - 1 if room == "one byte short" else need
    monkeypatch.setattr(preflight, "disk_free", lambda folder: free)  # what the file system would report
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch: the space check must come first
    code = cli.main(["submit", str(job_file), f"training.output_dir={tmp_path}/run", "--out", str(tmp_path / "gen")])
    err = capsys.readouterr().err.splitlines()
    assert code == Exit.SUBMIT_FAILED and len(err) == 1, err
    if room == "one byte short":
        # 13B full: bf16 weights (2 B) + fp32 master and Adam moments (12 B) per parameter, about 170 GiB
        assert err[0] == (f"orch: error: training.output_dir: {str(tmp_path)!r} has {free / GIB:.1f} GiB free, "
                          f"one checkpoint of this job needs {need / GIB:.1f} GiB")
    else:
        assert err[0].startswith("orch: error: sbatch not found on PATH")  # past the room check
    assert _files(tmp_path) == []


def test_checkpoint_bytes_hand_computed() -> None:
    # tiny-llama: hidden 64, intermediate 192, 2 layers, 4 heads of 16, 2 kv heads, vocab 512, untied.
    # per layer linears: q 64*64 + k 64*32 + v 64*32 + o 64*64 = 12,288; mlp 3*64*192 = 36,864 -> 49,152
    # per layer norms 2*64 = 128; embeddings 512*64 = 32,768; lm_head 32,768; final norm 64
    n = 2 * (49_152 + 128) + 32_768 + 32_768 + 64
    base = spec.load_job(TINY, check_paths=False)
    full = spec.load_job(TINY, ["method=full"], check_paths=False)
    # full fp32: weights 4 B + fp32 master, Adam m, v 12 B per parameter
    assert preflight.checkpoint_bytes(full, "single_gpu") == n * 4 + n * 12
    lora = spec.load_job(TINY, ["method=lora", "lora.target_modules=all-linear", "lora.r=8"], check_paths=False)
    # LoRA r=8 per layer: r*(in+out): q 8*128 + k 8*96 + v 8*96 + o 8*128 + gate/up/down 3*8*256; 2 layers
    a = 2 * (1024 + 768 + 768 + 1024 + 3 * 2048)
    # frozen base left out: lora weights (fp32) + optimizer 12 B per lora param + the adapter copy (fp32)
    assert preflight.checkpoint_bytes(lora, "single_gpu") == a * 4 + a * 12 + a * 4
    # qlora (r=8, all linears, block 64, double quant) adds bnb's quant state per 4-bit linear:
    # absmax blocks numel/64 as uint8 (q 64, k 32, v 32, o 64, gate/up/down 192 each = 768 per layer)
    # + per linear one fp32 nested absmax, one fp32 offset, the 256-entry fp32 code, the 16-entry fp32 NF4 code
    # = 4 + 4 + 1024 + 64 = 1,096 bytes x 7 linears; 2 layers
    consts = 2 * (768 + 7 * 1_096)
    assert base.method == "qlora" and base.lora.r == 8
    assert preflight.checkpoint_bytes(base, "single_gpu") == consts + a * 4 + a * 12 + a * 4
