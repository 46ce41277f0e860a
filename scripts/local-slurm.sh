#!/usr/bin/env bash
# A real, single-machine Slurm cluster for orch's tests and demos.
#
#   scripts/local-slurm.sh          # install if missing, configure, start; prints SLURM_CONF=<path>
#   scripts/local-slurm.sh stop     # cancel jobs, stop the daemons (state dir is kept)
#   scripts/local-slurm.sh status   # sinfo
#
# Two logical nodes (n1, n2) run as two `slurmd -N` on this host, so multi-node
# jobs (srun one task per node, SLURM_NODEID 0 and 1) really run. Choices, each
# found necessary on this machine (see shared notes):
#   * GPU gres File= entries are character devices (mknod), not plain files:
#     with plain files nodes register but jobs get no CUDA_VISIBLE_DEVICES.
#   * SlurmdParameters=config_overrides: nodes advertise the configured CPUs,
#     memory and GPUs (8 GPUs, 128 CPUs, 2 TB each), so `sbatch --test-only`
#     accepts scripts generated for real clusters; nothing is really reserved.
#   * ProctrackType=proctrack/pgid: linuxproc leaked children of a batch script
#     that exited from a trap.
#   * AuthInfo cred_expire=5: a requeued job runs again after ~6 s, not 121 s.
#   * Partitions debug (default) and gpu, and node features a100,h100,ib, so
#     scripts generated for real clusters (partition=gpu, --constraint) validate.
# Idempotent: a running cluster with the same config is left alone.
# Needs root (munged, slurmd, mknod, /etc/hosts), or passwordless sudo. Environment:
#   ORCH_SLURM_DIR   state dir (default /tmp/orch-slurm)
set -euo pipefail

# Daemons, mknod and /etc/hosts need root: rerun under passwordless sudo (CI runners).
if [[ $(id -u) != 0 ]]; then
  if sudo -n true 2>/dev/null; then exec sudo -n -E bash "$0" "$@"; fi
  echo "local-slurm: needs root (or passwordless sudo)" >&2
  exit 3
fi

DIR=${ORCH_SLURM_DIR:-/tmp/orch-slurm}
CONF="$DIR/slurm.conf"
HOST=$(hostname -s)
export SLURM_CONF="$CONF"

log() { echo "local-slurm: $*" >&2; }

# A daemon is alive if its pid exists and is not a zombie (no systemd reaps here).
alive() {
  local pid=$1 stat
  stat=$(ps -o stat= -p "$pid" 2>/dev/null || true)
  [[ -n "$stat" && "$stat" != Z* ]]
}

pid_alive() {
  local f=$1
  [[ -f "$f" ]] && alive "$(cat "$f")"
}

stop() {
  if [[ -f "$CONF" ]] && command -v scancel >/dev/null && pid_alive "$DIR/slurmctld.pid"; then
    scancel --full --quiet --user="${SUDO_USER:-$(id -un)}" 2>/dev/null || true
    sleep 1
  fi
  for f in "$DIR"/slurmd-n*.pid "$DIR/slurmctld.pid"; do
    [[ -f "$f" ]] || continue
    local pid
    pid=$(cat "$f")
    if alive "$pid"; then
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do alive "$pid" || break; sleep 0.1; done
    fi
    rm -f "$f"
  done
  log "stopped"
}

install() {
  if command -v slurmctld >/dev/null && command -v munged >/dev/null; then
    return
  fi
  if ! command -v apt-get >/dev/null; then
    log "slurm-wlm is not installed and apt-get is unavailable"
    exit 3
  fi
  log "installing slurm-wlm and munge with apt-get"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >&2
}

write_conf() {
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/dev"
  for i in 0 1 2 3 4 5 6 7; do
    # /dev/null's major/minor: a character device that Slurm can "bind".
    [[ -c "$DIR/dev/gpu$i" ]] || { rm -f "$DIR/dev/gpu$i"; mknod "$DIR/dev/gpu$i" c 1 3; }
  done
  cat > "$CONF.new" <<EOF
ClusterName=local
SlurmctldHost=$HOST
SlurmctldPort=16817
SlurmdPort=16818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
GresTypes=gpu
ReturnToService=2
MinJobAge=600
SchedulerParameters=sched_interval=2
MpiDefault=none
NodeName=n[1-2] NodeHostname=$HOST NodeAddr=127.0.0.1 Port=17001-17002 CPUs=128 RealMemory=2097152 Gres=gpu:8 Feature=a100,h100,ib State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES OverSubscribe=FORCE:4 MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=n[1-2] Default=NO OverSubscribe=FORCE:4 MaxTime=INFINITE State=UP
EOF
  echo "NodeName=n[1-2] Name=gpu File=$DIR/dev/gpu[0-7]" > "$DIR/gres.conf.new"
  local changed=0
  cmp -s "$CONF.new" "$CONF" || changed=1
  cmp -s "$DIR/gres.conf.new" "$DIR/gres.conf" || changed=1
  mv "$CONF.new" "$CONF"
  mv "$DIR/gres.conf.new" "$DIR/gres.conf"
  return $changed
}

# The logical nodes' names must resolve (they are the rendezvous master address).
hosts_entries() {
  for n in n1 n2; do
    getent hosts "$n" >/dev/null || echo "127.0.0.1 $n" >> /etc/hosts
  done
}

start() {
  install
  hosts_entries
  local changed=0
  write_conf || changed=1
  if [[ $changed == 1 ]]; then
    stop 2>/dev/null || true
  fi
  if ! pgrep -x munged >/dev/null; then
    mkdir -p /run/munge && chown munge:munge /run/munge 2>/dev/null || true
    [[ -f /etc/munge/munge.key ]] || { mungekey --create 2>/dev/null || create-munge-key; }
    munged --force 2>/dev/null
  fi
  pid_alive "$DIR/slurmctld.pid" || slurmctld -f "$CONF"
  for n in n1 n2; do
    pid_alive "$DIR/slurmd-$n.pid" || slurmd -f "$CONF" -N "$n"
  done
  # Wait until both nodes are up (first registration takes a moment).
  for _ in $(seq 100); do
    if sinfo -h -N -p debug -o '%N %t' 2>/dev/null | awk '$2 ~ /^(idle|mix|alloc)/' | wc -l | grep -qx 2; then
      echo "SLURM_CONF=$CONF"
      return 0
    fi
    scontrol update nodename=n[1-2] state=resume >/dev/null 2>&1 || true
    sleep 0.2
  done
  log "nodes did not come up; see $DIR/log/"
  sinfo -N >&2 || true
  exit 1
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  status) sinfo -N ;;
  *) echo "usage: $0 [start|stop|status]" >&2; exit 2 ;;
esac
