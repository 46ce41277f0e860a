"""Stop signals end in a checkpoint, whatever sends them and whatever state wandb is in.

orch's launcher (orchestrator/launch.py) first, with small stand-in ranks: the rendezvous
environment, exit statuses, a failing rank ending the others, stop signals passed on to the
ranks. Then the real thing: `orch submit --local` (the launcher in orch's own process, real
trainer ranks, real DeepSpeed on the CPU) started in a session of its own, and a signal to the
whole process group (what Slurm and `kill -- -PGID` do, and Ctrl-C in a terminal).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator import checkpoint, launch
from orchestrator.errors import Exit
from tests.cli_helpers import REPO_ROOT, orch_env

# A stand-in rank: writes its rendezvous environment, then does what its argument for its local rank says.
FAKE_RANK = '''
import json, os, signal, sys, time
got = []
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
    signal.signal(sig, lambda s, f: got.append(signal.Signals(s).name))
out, rank = sys.argv[1], os.environ["RANK"]
what = sys.argv[2 + int(os.environ["LOCAL_RANK"])]
names = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE",
         "CROSS_RANK", "CROSS_SIZE")
with open(os.path.join(out, f"env-{rank}.json"), "w") as f:
    json.dump({k: os.environ[k] for k in names}, f)
if what.startswith("exit"):
    sys.exit(int(what[4:]))
if what == "die":
    os.kill(os.getpid(), signal.SIGKILL)
if what == "forever":
    while True:
        time.sleep(1)
if what == "stop":  # like a trainer: wait for a stop signal, "checkpoint" for a while, exit 75
    while not got:
        time.sleep(0.05)
    time.sleep(1.0)
    with open(os.path.join(out, f"signals-{rank}.json"), "w") as f:
        json.dump(got, f)
    sys.exit(75)
'''


@pytest.fixture
def fake_rank(tmp_path, monkeypatch) -> Path:
    """A module `_orch_fake_rank` importable by the ranks; returns the folder the ranks write into."""
    (tmp_path / "mod").mkdir()
    (tmp_path / "mod" / "_orch_fake_rank.py").write_text(FAKE_RANK)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "mod"), str(REPO_ROOT)]))
    (tmp_path / "out").mkdir()
    return tmp_path / "out"


def _spec(out: Path, *what: str, **kw) -> launch.LaunchSpec:
    return launch.LaunchSpec(nproc_per_node=len(what), module="_orch_fake_rank", args=(str(out), *what), **kw)


def test_launcher_gives_each_rank_its_rendezvous(fake_rank):
    spec = _spec(fake_rank, "exit0", "exit0", nnodes=3, node_rank=1, master_addr="n1", master_port=21234)
    assert launch.launch(spec) == Exit.OK
    got = {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in fake_rank.glob("env-*.json")}
    # node 1 of 3 with 2 ranks each holds global ranks 2 and 3 of 6
    assert got == {r: {"RANK": str(r), "LOCAL_RANK": str(r - 2), "WORLD_SIZE": "6", "LOCAL_WORLD_SIZE": "2",
                       "MASTER_ADDR": "n1", "MASTER_PORT": "21234", "LOCAL_SIZE": "2", "CROSS_RANK": "1",
                       "CROSS_SIZE": "3"} for r in (2, 3)}


@pytest.mark.parametrize("what,status", [
    (("exit0", "exit75"), Exit.REQUEUE),  # one rank finished, one stopped with a checkpoint: requeue
    (("exit75", "exit75"), Exit.REQUEUE),
    (("exit0", "exit3"), 3),  # a failing rank's status passes through
    (("die", "exit0"), 128 + signal.SIGKILL),  # killed by a signal: as a shell reports it
    (("exit5", "forever"), Exit.TRAIN_FAILED),  # ... and the others are ended (or this would never return)
])
def test_launcher_exit_status(fake_rank, capsys, what, status):
    assert launch.launch(_spec(fake_rank, *what)) == status
    err = capsys.readouterr().err
    failed = status not in (Exit.OK, Exit.REQUEUE)
    assert ("exited with status" in err) == failed, err
    if "forever" in what:
        assert f"orch launch: rank 0 exited with status {status}; stopping the other ranks" in err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_launcher_passes_stop_signals_to_the_ranks(fake_rank, sig):
    """The signal goes to the launcher alone (`kill PID`): each rank gets it from the launcher, keeps
    running to "checkpoint", and the launcher waits for them and exits 75 (DeepSpeed's launcher killed
    its ranks on TERM and INT and exited 1)."""
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.launch", "--nproc-per-node", "2", "--module",
                             "_orch_fake_rank", "--", str(fake_rank), "stop", "stop"],
                            start_new_session=True, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(list(fake_rank.glob("env-*.json"))) < 2:
            assert time.monotonic() < deadline and proc.poll() is None, "ranks did not start"
            time.sleep(0.05)
        os.kill(proc.pid, sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == Exit.REQUEUE, err
    for rank in (0, 1):
        assert json.loads((fake_rank / f"signals-{rank}.json").read_text()) == [sig.name]
    assert f"orch launch: {sig.name} received; asking 2 rank(s) to checkpoint and stop" in err
    assert "Traceback" not in err


# ---------------------------------------------------------------------------
# the real trainer under `orch submit --local`


def _submit_local(tmp_path: Path, out: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli", "submit", "jobs/tiny.yaml", "--local", "--out", str(tmp_path / "gen"),
            f"training.output_dir={out}", "training.save_every=0", "training.lr_schedule=constant", *overrides]


def _wandb_service(pid: int) -> list:
    """The wandb-core process that the rank with process id ``pid`` started."""
    import psutil

    return [p for p in psutil.process_iter(["name", "cmdline"])
            if p.info["name"] == "wandb-core" and str(pid) in (p.info["cmdline"] or [])]


def _logged_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
@pytest.mark.parametrize("sig,ranks,wandb", [
    (signal.SIGTERM, 1, "running"),  # Slurm's SIGTERM, wandb logging offline and alive
    (signal.SIGINT, 1, "killed"),  # Ctrl-C, after wandb's service died (Slurm kills every process of the job)
    (signal.SIGUSR1, 2, "disabled"),  # Slurm's warning signal, two ranks (ZeRO-2) that must agree on the step
])
def test_process_group_signal_checkpoints_exits_75_and_resumes(tmp_path, sig, ranks, wandb):
    out = tmp_path / "run"
    extra = [f"hardware.gpus_per_node={ranks}", "strategy=zero2"] if ranks == 2 else []
    mode = "disabled" if wandb == "disabled" else "offline"
    err_path = tmp_path / "stderr"
    with err_path.open("w") as err:
        proc = subprocess.Popen(_submit_local(tmp_path, out, "training.max_steps=100000", f"logging.wandb_mode={mode}",
                                              *extra), cwd=REPO_ROOT, env=orch_env(), stdout=subprocess.DEVNULL,
                                stderr=err, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while len(_logged_steps(out)) < 2 * ranks:
            assert time.monotonic() < deadline and proc.poll() is None, err_path.read_text()[-3000:]
            time.sleep(0.2)
        if wandb == "killed":
            import psutil

            (rank0,) = psutil.Process(proc.pid).children()
            (service,) = _wandb_service(rank0.pid)
            service.kill()
            # a zombie until its parent (the rank's wandb client) reaps it, which it may never do
            while service.is_running() and service.status() != psutil.STATUS_ZOMBIE:
                assert time.monotonic() < deadline, "wandb-core outlived SIGKILL"
                time.sleep(0.05)
            logged = len(_logged_steps(out))
            while len(_logged_steps(out)) < logged + 2:  # training goes on without wandb
                assert time.monotonic() < deadline and proc.poll() is None, err_path.read_text()[-3000:]
                time.sleep(0.2)
        before = max(_logged_steps(out))
        os.killpg(proc.pid, sig)  # the whole group: orch submit (the launcher), the ranks
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    err = err_path.read_text()
    assert proc.returncode == Exit.REQUEUE, err[-3000:]
    assert "Traceback" not in err and "orch: error" not in err, err[-3000:]
    latest = checkpoint.latest(out / "checkpoints")
    assert latest is not None and latest.step >= before, (latest, before)  # at a step boundary after the signal
    assert latest.step == max(_logged_steps(out))
    assert f"orch: stopped by {sig.name} at step {latest.step}; checkpoint written, continue with --resume" in err
    warnings = [line for line in err.splitlines() if line.startswith("orch: warning: wandb")]
    if wandb == "killed":
        # wandb's client may notice the dead service (one warning: tests/test_train_unit.py) or not
        assert len(warnings) <= 1, warnings
    else:
        assert warnings == []
    if wandb == "running":
        assert list(out.glob("wandb/offline-run-*/run-*.wandb")), "wandb offline run missing"

    # --resume continues from that checkpoint and finishes two more steps
    final = latest.step + 2
    resumed = subprocess.run(_submit_local(tmp_path, out, f"training.max_steps={final}", f"logging.wandb_mode={mode}",
                                           *extra, "--resume"), cwd=REPO_ROOT, env=orch_env(), capture_output=True,
                             text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {latest.path} at step {latest.step}" in resumed.stderr
    steps = _logged_steps(out)
    assert sorted(set(steps)) == list(range(1, final + 1))
    assert all(steps.count(s) == ranks for s in (latest.step + 1, final))  # the new steps, once per rank
    assert json.loads((out / "summary.json").read_text())["steps"] == final
