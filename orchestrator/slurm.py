"""The Slurm batch script for a compiled job.

`render_sbatch` is pure: the same job, strategy and paths give the same text,
byte for byte, on any machine. Every value that comes from the spec is passed
through `shlex.quote`, both in ``#SBATCH`` lines (sbatch parses them with shell
quoting rules) and in the body. The only spec text that runs as written is
``slurm.setup`` (module loads, venv activation): the spec calls those lines
trusted.

How a job runs (multi-node is the normal case)::

    batch shell (node 0)
      setup lines; rendezvous = first host of the allocation, port from the job id
      srun: one task per node ──> bash: ignore USR1, TERM, INT
          python -m orchestrator.launch --nnodes N --node-rank $SLURM_NODEID
                 --nproc-per-node G --master-addr A --master-port P --module orchestrator.train
                 -- --job JOB.yaml --ds-config X.json [--resume|--restart]
            └─ G trainer ranks (python -m orchestrator.train ...)

Checkpoint before the time limit: ``--signal=B:USR1@<signal_seconds>`` sends
SIGUSR1 to the batch shell only. Its trap forwards SIGUSR1 to srun, which
delivers it to every process of the step on every node. The node task shell
ignores it (``trap ""``); orch's launcher (orchestrator/launch.py) forwards it
to its ranks and keeps waiting; each trainer rank saves a checkpoint at the next
step boundary and exits with status 75 (errors.Exit.REQUEUE); the launcher exits
75, the node task turns that into a mark file (and exit 0, so that srun's
--kill-on-bad-exit leaves the other nodes alone); the batch shell sees the mark
when srun ends, runs ``scontrol requeue`` and the rerun (SLURM_RESTART_COUNT >
0) passes ``--resume``. A trainer that finished all its steps before the signal
exits 0: no requeue. SIGTERM (preemption, the time limit, ``scancel
--signal=TERM``) takes the same path: the batch shell forwards it too and keeps
waiting, the node shell ignores it, the launcher forwards it (DeepSpeed's
launcher, used before, killed its ranks on TERM and exited 1).

The script's one optional argument (``sbatch SCRIPT --resume|--restart``, what `orch submit
--resume|--restart` passes) goes to the trainer on the first run: what to do with a run already in
the output dir, which the trainer refuses otherwise.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from orchestrator.errors import Exit
from orchestrator.spec import JobSpec

# Ports for the rendezvous: 20000 + job id % 20000 stays clear of the
# ephemeral range (32768+) and of well-known ports, and differs between jobs
# that share a node.
PORT_BASE = 20000
PORT_SPAN = 20000

@dataclass(frozen=True)
class SbatchPaths:
    """Where the generated script finds and puts things (paths as the job will see them)."""

    job_yaml: str
    """The compiled job spec (`dump_job` output) that the trainer reads."""
    ds_config: str
    """The DeepSpeed JSON the trainer passes to deepspeed.initialize."""
    log_dir: str
    """Folder for the Slurm log (stdout and stderr of the batch script) and the requeue mark.
    Must be on a file system shared by all nodes; `orch submit` creates it."""
    python: str = "python3"
    """Python interpreter that has orch and DeepSpeed installed, as found after the setup lines."""
    module: str = "orchestrator.train"
    """Python module every rank runs (the trainer; tests swap in a small launch probe)."""


def log_file_pattern(job: JobSpec, paths: SbatchPaths) -> str:
    """The --output pattern (Slurm fills in %j). Literal '%' in a path is escaped as '%%'."""
    return f"{paths.log_dir.replace('%', '%%')}/{job.slug()}-%j.log"


def log_file(job: JobSpec, paths: SbatchPaths, job_id: str) -> str:
    """The log path of a submitted job."""
    return f"{paths.log_dir}/{job.slug()}-{job_id}.log"


def mem_mib(job: JobSpec) -> int:
    """Host memory to request per node (slurm.mem_gb, else hardware.host_ram_gb)."""
    gb = job.slurm.mem_gb if job.slurm.mem_gb is not None else job.hardware.host_ram_gb
    return int(gb * 1024)


def sbatch_options(job: JobSpec, paths: SbatchPaths) -> list[str]:
    """The #SBATCH options, sorted by option name, values shell-quoted."""
    hw, sl = job.hardware, job.slurm
    q = shlex.quote
    log = q(log_file_pattern(job, paths))
    opts = [
        f"--nodes={hw.nodes}",
        "--ntasks-per-node=1",  # one orch launcher per node; it starts one rank per GPU
        f"--gpus-per-node={hw.gpus_per_node}",
        f"--cpus-per-task={hw.cpus_per_node}",
        f"--mem={mem_mib(job)}M",
        f"--time={sl.time}",
        f"--job-name={q(job.name)}",
        f"--output={log}",
        f"--error={log}",
        "--open-mode=append",  # a requeued run appends to the same log
        f"--signal=B:USR1@{sl.signal_seconds}",
        "--requeue",
    ]
    if sl.partition:
        opts.append(f"--partition={q(sl.partition)}")
    if sl.account:
        opts.append(f"--account={q(sl.account)}")
    if sl.qos:
        opts.append(f"--qos={q(sl.qos)}")
    for extra in sl.extra_sbatch:
        name, sep, value = extra.partition("=")
        opts.append(f"{name}={q(value)}" if sep else q(name))
    return sorted(opts, key=lambda o: o.split("=", 1)[0])


def environment(job: JobSpec) -> list[tuple[str, str]]:
    """Variables every rank needs. Secrets (WANDB_API_KEY, HF_TOKEN) are never
    written here: the job inherits them from the submitting environment."""
    hw, lg = job.hardware, job.logging
    env = [
        # NVLink SHARP multicast hangs or fails on many clusters (and on shared
        # nodes); plain NVLink rings lose little for finetuning collectives.
        ("NCCL_NVLS_ENABLE", "0"),
        ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"),  # a dead rank fails the job instead of hanging it
        ("NCCL_DEBUG", "WARN"),
        # CPU threads per rank: the node's cores split between its GPUs' ranks.
        ("OMP_NUM_THREADS", str(max(1, hw.cpus_per_node // hw.gpus_per_node))),
        ("WANDB_MODE", lg.wandb_mode),
        ("WANDB_PROJECT", lg.wandb_project),
    ]
    if lg.wandb_entity:
        env.append(("WANDB_ENTITY", lg.wandb_entity))
    return env


# The per-node task. A constant string: spec values reach it only through the
# ORCH_* variables exported by the batch shell (srun passes the environment), so
# nothing in a spec is ever parsed as shell code here. `trap "" USR1 TERM INT`
# keeps this shell alive through the stop signals (Slurm sends them to every process of
# the step), so that it can leave the requeue mark; orch's launcher installs its own
# handlers (they replace the inherited SIG_IGN) and forwards the signals to the ranks.
_NODE_TASK = (
    'trap "" USR1 TERM INT; '
    '"$ORCH_PYTHON" -u -m orchestrator.launch '
    '--nnodes "$SLURM_JOB_NUM_NODES" --node-rank "$SLURM_NODEID" --nproc-per-node "$ORCH_GPUS_PER_NODE" '
    '--master-addr "$ORCH_MASTER_ADDR" --master-port "$ORCH_MASTER_PORT" --module "$ORCH_MODULE" '
    '-- --job "$ORCH_JOB_YAML" --ds-config "$ORCH_DS_CONFIG" ${ORCH_RUN_FLAG:+"$ORCH_RUN_FLAG"}; '
    # Exit.REQUEUE = checkpoint written, requeue me: leave a mark and exit 0, so that
    # srun --kill-on-bad-exit does not kill the other nodes while they save.
    f'rc=$?; if [ "$rc" -eq {int(Exit.REQUEUE)} ]; then : > "$ORCH_REQUEUE_MARK"; rc=0; fi; exit "$rc"'
)


def render_sbatch(job: JobSpec, strategy: str, paths: SbatchPaths) -> str:
    """The batch script for ``job`` compiled with ``strategy``."""
    q = shlex.quote
    hw = job.hardware
    lines = [
        "#!/bin/bash",
        f"# Generated by `orch compile` for job {q(job.name)} (strategy {strategy},",
        f"# {hw.nodes} node(s) x {hw.gpus_per_node} GPU(s)). Do not edit: change the job spec and recompile.",
    ]
    lines += [f"#SBATCH {opt}" for opt in sbatch_options(job, paths)]
    lines += [
        "",
        # Not -u: module and venv activation scripts read unset variables.
        "set -eo pipefail",
        "",
    ]
    if job.slurm.setup:
        lines.append("# Setup lines from the job spec (trusted: run as written).")
        lines += list(job.slurm.setup)
        lines.append("")
    lines.append("# Training environment (secrets such as WANDB_API_KEY and HF_TOKEN come from the submitting shell).")
    lines += [f"export {k}={q(v)}" for k, v in environment(job)]
    lines += [
        "",
        f"export ORCH_PYTHON={q(paths.python)}",
        f"export ORCH_MODULE={q(paths.module)}",
        f"export ORCH_JOB_YAML={q(paths.job_yaml)}",
        f"export ORCH_DS_CONFIG={q(paths.ds_config)}",
        f"export ORCH_GPUS_PER_NODE={hw.gpus_per_node}",
        f"ORCH_LOG_DIR={q(paths.log_dir)}",
        'export ORCH_REQUEUE_MARK="$ORCH_LOG_DIR/requeue-$SLURM_JOB_ID"',
        'rm -f "$ORCH_REQUEUE_MARK"',
        "",
        "# Rendezvous: the first node of the allocation is the master; the port is",
        "# derived from the job id so jobs sharing a node do not collide.",
        'ORCH_MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"ORCH_MASTER_PORT=$(( {PORT_BASE} + SLURM_JOB_ID % {PORT_SPAN} ))",
        "export ORCH_MASTER_ADDR ORCH_MASTER_PORT",
        "",
        "# A run already in the output dir: the script's argument says what to do with it (orch submit",
        "# --resume or --restart; without one the trainer refuses it); a requeued run resumes its own.",
        'case "${1:-}" in',
        '  ""|--resume|--restart) ;;',
        '  *) echo "orch: this script takes --resume or --restart, not ${1}" >&2; exit 2 ;;',
        "esac",
        'if [[ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]]; then ORCH_RUN_FLAG=--resume; else ORCH_RUN_FLAG=${1:-}; fi',
        "export ORCH_RUN_FLAG",
        "",
        "# Before the time limit Slurm sends USR1 to this shell: forward it to the",
        "# trainer ranks (through srun), let them checkpoint and exit, then requeue.",
        "# TERM (preemption, the time limit, kill) is forwarded the same way, and this",
        "# shell keeps waiting for the ranks instead of ending the job under them.",
        "orch_preempted=0",
        "orch_on_usr1() {",
        "  orch_preempted=1",
        '  echo "orch: USR1 received, asking the trainer to checkpoint" >&2',
        '  kill -USR1 "$orch_srun_pid" 2>/dev/null || true',
        "}",
        "orch_on_term() {",
        '  echo "orch: TERM received, asking the trainer to checkpoint" >&2',
        '  kill -TERM "$orch_srun_pid" 2>/dev/null || true',
        "}",
        "trap orch_on_usr1 USR1",
        "trap orch_on_term TERM",
        "",
        'echo "orch: job $SLURM_JOB_ID on $SLURM_JOB_NUM_NODES node(s), master $ORCH_MASTER_ADDR:$ORCH_MASTER_PORT, restart ${SLURM_RESTART_COUNT:-0}" >&2',
        # --kill-on-bad-exit: one failed node ends the step instead of leaving the others waiting.
        'srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \\',
        f"  bash -c {q(_NODE_TASK)} &",
        "orch_srun_pid=$!",
        "# wait returns early when the trap runs; keep waiting until srun has ended.",
        "while true; do",
        '  orch_rc=0; wait "$orch_srun_pid" || orch_rc=$?',
        '  kill -0 "$orch_srun_pid" 2>/dev/null || break',
        "done",
        f"# A trainer that wrote a checkpoint on a stop signal exits {int(Exit.REQUEUE)}; its node task left the mark.",
        'if [[ -f "$ORCH_REQUEUE_MARK" ]]; then',
        '  rm -f "$ORCH_REQUEUE_MARK"',
        '  echo "orch: checkpoint written (USR1 received: $orch_preempted); requeueing job $SLURM_JOB_ID" >&2',
        '  scontrol requeue "$SLURM_JOB_ID"',
        "  exit 0",
        "fi",
        'exit "$orch_rc"',
        "",
    ]
    return "\n".join(lines)
