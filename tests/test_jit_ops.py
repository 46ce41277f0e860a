"""DeepSpeed's JIT ops load even when a killed build left torch's lock file behind.

Before orchestrator/jit_ops.py, such a lock made every later run on the machine wait forever
at 0 % CPU inside torch's FileBaton.wait (it hung a CI run). The load below runs in a fresh
Python with TORCH_EXTENSIONS_DIR in tmp_path, so the user's cache is not touched.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from orchestrator import jit_ops
from orchestrator.strategy import STRATEGIES


def test_stale_lock_is_removed_once(tmp_path: Path) -> None:
    (tmp_path / "lock").touch()
    assert jit_ops.remove_stale_lock(tmp_path)
    assert not (tmp_path / "lock").exists()
    assert not jit_ops.remove_stale_lock(tmp_path)


def test_optimizer_ops_follow_the_strategy() -> None:
    assert jit_ops.optimizer_ops(STRATEGIES["single_gpu"], cuda=False) == []
    assert jit_ops.optimizer_ops(STRATEGIES["zero2"], cuda=True) == [jit_ops.FUSED_ADAM]
    assert jit_ops.optimizer_ops(STRATEGIES["zero3_offload_optimizer"], cuda=True) == [jit_ops.CPU_ADAM]
    assert jit_ops.optimizer_ops(STRATEGIES["zero3_offload_all_nvme"], cuda=False) == [jit_ops.CPU_ADAM,
                                                                                      jit_ops.ASYNC_IO]


def test_shm_op_loads_past_a_lock_left_by_a_killed_build(tmp_path: Path) -> None:
    ext = tmp_path / "torch_extensions"
    probe = ("from torch.utils.cpp_extension import _get_build_directory as d; "
             "print(d('deepspeed_shm_comm', verbose=False))")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(ext)}
    build_dir = Path(subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                                    check=True).stdout.strip().splitlines()[-1])
    # A build made by an earlier run saves this test the compile; without one it compiles here.
    cached = Path(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                 env={k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"},
                                 check=True).stdout.strip().splitlines()[-1])
    if (cached / "deepspeed_shm_comm.so").exists():
        shutil.copytree(cached, build_dir, ignore=shutil.ignore_patterns("lock", "orch.flock"), dirs_exist_ok=True)
    build_dir.mkdir(parents=True, exist_ok=True)
    (build_dir / "lock").touch()  # what a process killed during torch's build leaves

    load = "from orchestrator import jit_ops; print('loaded', jit_ops.load_ops([jit_ops.SHM_COMM]))"
    # The timeout only turns the old behaviour (waiting forever) into a failure.
    out = subprocess.run([sys.executable, "-c", load], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "loaded ['ShareMemCommBuilder']" in out.stdout
    assert "removed a stale build lock" in out.stderr
    assert not (build_dir / "lock").exists()


def test_each_python_environment_builds_in_its_own_folder(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    show = "import os; from orchestrator import jit_ops; jit_ops.load_ops([]); print(os.environ['TORCH_EXTENSIONS_DIR'])"
    out = subprocess.run([sys.executable, "-c", show], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == str(Path(sys.prefix) / "torch_extensions")
    # a folder the user chose is kept
    out = subprocess.run([sys.executable, "-c", show], env={**env, "TORCH_EXTENSIONS_DIR": str(tmp_path)},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == str(tmp_path)


def test_training_runs_leave_no_shared_memory_behind(tmp_path: Path) -> None:
    # DeepSpeed's shared-memory all-reduce mapped a 66 MB /dev/shm buffer per rank at init_distributed and
    # never unlinked it; the trainer turns the op off (jit_ops.disable_shm_comm) before init_distributed
    port = 29000 + os.getpid() % 1000
    start = ("import os; os.environ.update(RANK='0', LOCAL_RANK='0', WORLD_SIZE='1', MASTER_ADDR='127.0.0.1', "
             f"MASTER_PORT='{port}'); import deepspeed; from orchestrator import jit_ops; jit_ops.disable_shm_comm(); "
             "deepspeed.init_distributed(dist_backend='gloo', verbose=False); "
             "from deepspeed import comm; print('shm op', comm.comm.cdb.shm_comm_op)")
    out = subprocess.run([sys.executable, "-c", start], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "shm op None" in out.stdout
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not (tmp_path / "deepspeed_shm_comm").exists()  # and nothing was built
