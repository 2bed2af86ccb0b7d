#!/usr/bin/env bash
# slurm_localhost.sh -- single-node, localhost-only Slurm cluster for CI (moeforge's copy of the measured
# recipe; used by .ci/run and tests/launch, see docs/launch.md).
#
# Tested on Debian 12 (bookworm) Firecracker VM, root, no systemd as PID 1,
# Slurm 22.05.8 + munge 0.5.15 from Debian main.
#
# Usage (as root):
#   slurm_localhost.sh up        # install (idempotent) + configure + start munged/slurmctld/slurmd, wait for idle node
#   slurm_localhost.sh down      # cancel jobs, stop daemons by PID (pidfiles), remove cgroup dirs
#   slurm_localhost.sh status    # scontrol ping + sinfo + squeue
#   slurm_localhost.sh wait JOBID [TIMEOUT_S]   # poll (0.2 s) until job leaves the queue; prints final state;
#                                               # exit 0 iff COMPLETED (sbatch --wait polls slowly: ~10 s)
#   slurm_localhost.sh install   # only the apt part
#
# Knobs (environment):
#   SLURM_CI_CPUS=8            CPUs advertised for node "localhost" (SlurmdParameters=config_overrides lets
#                              this exceed the real core count, so several 1-CPU test jobs can run at once)
#   SLURM_CI_MEM_MB=auto       RealMemory (auto = MemTotal - 1 GiB)
#   SLURM_CI_PROCTRACK=auto    auto|cgroup|linuxproc  (auto: cgroup if a cgroup-v1 freezer hierarchy is mounted)
#   SLURM_CI_KILLWAIT=30       seconds between SIGTERM and SIGKILL at time limit / scancel / requeue
#   SLURM_CI_CRED_EXPIRE=10    AuthInfo=cred_expire; ALSO the minimum delay before a requeued job may restart
#                              (Slurm default 120 s)
#   SLURM_CI_GRACETIME=0       GraceTime of the preemptable "debug" partition
#   SLURM_CI_REQUEUE_EXIT=     e.g. "99": batch jobs exiting with this code are requeued automatically
#   SLURM_CI_HYPERPOD_STUB=1   build+install a SPANK stub so `srun --auto-resume=1` (HyperPod) is accepted
#   SLURM_CI_READY_TIMEOUT=30
#   SLURM_CI_DOWN_GRACE=3      `down`: seconds after scancel before SIGKILLing leftover job PIDs (scontrol listpids)
set -euo pipefail

CPUS=${SLURM_CI_CPUS:-8}
MEM_MB=${SLURM_CI_MEM_MB:-auto}
PROCTRACK=${SLURM_CI_PROCTRACK:-auto}
KILLWAIT=${SLURM_CI_KILLWAIT:-30}
CRED_EXPIRE=${SLURM_CI_CRED_EXPIRE:-10}
GRACETIME=${SLURM_CI_GRACETIME:-0}
REQUEUE_EXIT=${SLURM_CI_REQUEUE_EXIT:-}
HYPERPOD_STUB=${SLURM_CI_HYPERPOD_STUB:-1}
READY_TIMEOUT=${SLURM_CI_READY_TIMEOUT:-30}
DOWN_GRACE=${SLURM_CI_DOWN_GRACE:-3}

CONF_DIR=/etc/slurm
STATE=/var/spool/slurm-ci
LOGS=/var/log/slurm-ci
RUNDIR=/run/slurm-ci
MUNGE_PID=/run/munge/munged.pid
CTLD_PID=$RUNDIR/slurmctld.pid
SLURMD_PID=$RUNDIR/slurmd.pid
STUB_SO=/usr/local/lib/slurm/auto_resume_stub.so

log() { printf '[slurm-ci %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root"
[ "$CRED_EXPIRE" -ge 5 ] || die "SLURM_CI_CRED_EXPIRE must be >= 5 (Slurm silently falls back to 120 s otherwise)"

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# ---------------------------------------------------------------- install
do_install() {
  local pkgs=(slurmctld slurmd slurm-client munge)
  local need=0
  for b in /usr/sbin/slurmctld /usr/sbin/slurmd /usr/bin/sbatch /usr/sbin/munged; do [ -x "$b" ] || need=1; done
  if [ "$HYPERPOD_STUB" = 1 ] && command -v gcc >/dev/null && [ ! -f /usr/include/slurm/spank.h ]; then
    pkgs+=(libslurm-dev); need=1
  fi
  if [ $need = 1 ]; then
    local t0=$SECONDS made_policy=0
    # postinst scripts must not try to start services (no systemd here)
    if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; made_policy=1; fi
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends "${pkgs[@]}" >/tmp/slurm-ci-apt.log 2>&1; then
      apt-get update -q >>/tmp/slurm-ci-apt.log 2>&1
      apt-get install -y -q --no-install-recommends "${pkgs[@]}" >>/tmp/slurm-ci-apt.log 2>&1 || { tail -20 /tmp/slurm-ci-apt.log; die "apt-get install failed"; }
    fi
    if [ $made_policy = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
    log "installed ${pkgs[*]} in $((SECONDS - t0)) s"
  fi
  if [ "$HYPERPOD_STUB" = 1 ] && [ ! -f "$STUB_SO" ]; then
    if command -v gcc >/dev/null && [ -f /usr/include/slurm/spank.h ]; then build_stub; else log "no gcc/spank.h: skipping --auto-resume stub"; fi
  fi
}

build_stub() {
  local src; src=$(mktemp --suffix=.c)
  cat > "$src" <<'EOF'
/* CI stub for SageMaker HyperPod's `srun --auto-resume=<0|1>` SPANK option.
 * Accepts the option and exports HYPERPOD_AUTO_RESUME_STUB=<value> to every task.
 * No node replacement / step re-run logic. */
#include <string.h>
#include <slurm/spank.h>
SPANK_PLUGIN(auto_resume_stub, 1);
static char ar_value[16] = "";
static int _opt_cb(int val, const char *optarg, int remote)
{ (void)val; (void)remote; strncpy(ar_value, optarg ? optarg : "1", sizeof(ar_value) - 1); return ESPANK_SUCCESS; }
struct spank_option spank_options[] = {
  { "auto-resume", "0|1", "HyperPod auto-resume (CI stub: accepted, exported as HYPERPOD_AUTO_RESUME_STUB)",
    2, 0, (spank_opt_cb_f) _opt_cb },
  SPANK_OPTIONS_TABLE_END
};
int slurm_spank_task_init(spank_t sp, int ac, char **av)
{ (void)ac; (void)av; if (ar_value[0]) spank_setenv(sp, "HYPERPOD_AUTO_RESUME_STUB", ar_value, 1); return ESPANK_SUCCESS; }
EOF
  mkdir -p "$(dirname "$STUB_SO")"
  gcc -shared -fPIC -O2 -o "$STUB_SO" "$src" && log "built $STUB_SO" || log "WARN: stub build failed"
  rm -f "$src"
}

# ---------------------------------------------------------------- config
detect_proctrack() {
  case "$PROCTRACK" in
    cgroup|linuxproc) echo "$PROCTRACK"; return;;
  esac
  # Slurm 22.05 cgroup/v2 wants systemd/dbus to create its scope; only use cgroup v1 here.
  if [ "$(stat -fc %T /sys/fs/cgroup/freezer 2>/dev/null)" = cgroupfs ] && [ -w /sys/fs/cgroup/freezer ]; then
    echo cgroup
  else
    echo linuxproc
  fi
}

write_config() {
  local mem pt
  if [ "$MEM_MB" = auto ]; then
    mem=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 - 1024 )); [ $mem -lt 512 ] && mem=512
  else mem=$MEM_MB; fi
  pt=$(detect_proctrack)
  mkdir -p "$CONF_DIR" "$STATE/ctld" "$STATE/d" "$LOGS" "$RUNDIR"
  if [ -f $CONF_DIR/slurm.conf ] && ! grep -q '^# generated by slurm_localhost.sh' $CONF_DIR/slurm.conf; then
    cp $CONF_DIR/slurm.conf $CONF_DIR/slurm.conf.pre-slurm-ci.$(date +%s)
  fi
  cat > $CONF_DIR/slurm.conf <<EOF
# generated by slurm_localhost.sh -- single node, 127.0.0.1 only, no accounting
ClusterName=ci
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=${CRED_EXPIRE}
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/${pt}
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=${LOGS}/jobcomp.log
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
JobRequeue=1
${REQUEUE_EXIT:+RequeueExit=${REQUEUE_EXIT}}
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=${KILLWAIT}
MinJobAge=300
InactiveLimit=0
MailProg=/bin/true
StateSaveLocation=${STATE}/ctld
SlurmdSpoolDir=${STATE}/d
SlurmctldPidFile=${CTLD_PID}
SlurmdPidFile=${SLURMD_PID}
SlurmctldLogFile=${LOGS}/slurmctld.log
SlurmdLogFile=${LOGS}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldPort=6817
SlurmdPort=6818
NodeName=localhost NodeAddr=127.0.0.1 CPUs=${CPUS} Sockets=1 CoresPerSocket=${CPUS} ThreadsPerCore=1 RealMemory=${mem} State=UNKNOWN
# "debug" (default) is preemptable (REQUEUE) by jobs in "urgent"
PartitionName=debug  Nodes=localhost Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=${GRACETIME}
PartitionName=urgent Nodes=localhost Default=NO  MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
  if [ "$pt" = cgroup ]; then
    cat > $CONF_DIR/cgroup.conf <<'EOF'
# generated by slurm_localhost.sh
CgroupPlugin=cgroup/v1
CgroupAutomount=no
ConstrainCores=no
ConstrainRAMSpace=no
ConstrainDevices=no
EOF
  fi
  mkdir -p $CONF_DIR/plugstack.conf.d
  [ -f $CONF_DIR/plugstack.conf ] || echo "include $CONF_DIR/plugstack.conf.d/*.conf" > $CONF_DIR/plugstack.conf
  if [ -f "$STUB_SO" ]; then echo "optional $STUB_SO" > $CONF_DIR/plugstack.conf.d/auto_resume_stub.conf
  else rm -f $CONF_DIR/plugstack.conf.d/auto_resume_stub.conf; fi
  log "wrote $CONF_DIR/slurm.conf (ProctrackType=proctrack/$pt CPUs=$CPUS RealMemory=$mem)"
}

# ---------------------------------------------------------------- start/stop
start_munge() {
  if pid_alive $MUNGE_PID; then log "munged already running (pid $(cat $MUNGE_PID))"; return; fi
  if [ ! -s /etc/munge/munge.key ]; then
    install -d -o munge -g munge -m 0700 /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
  runuser -u munge -- /usr/sbin/munged
  munge -n | unmunge >/dev/null || die "munge self-test failed"
  log "munged pid $(cat $MUNGE_PID)"
}

ensure_hostname_resolves() {
  # Slurm itself only uses 'localhost'/127.0.0.1, but torchrun's c10d rendezvous advertises
  # socket.getfqdn() to workers; an unresolvable hostname makes them hang.
  local h; h=$(hostname)
  getent hosts "$h" >/dev/null || { echo "127.0.0.1 $h" >> /etc/hosts; log "added '$h' to /etc/hosts"; }
}

do_up() {
  local t0=$SECONDS
  do_install
  ensure_hostname_resolves
  if pid_alive $CTLD_PID || pid_alive $SLURMD_PID; then die "slurm daemons already running; run '$0 down' first"; fi
  rm -rf "$STATE" && mkdir -p "$STATE/ctld" "$STATE/d"       # fresh cluster state every time
  mkdir -p "$LOGS"; : > "$LOGS/slurmctld.log"; : > "$LOGS/slurmd.log"; : > "$LOGS/jobcomp.log"
  write_config
  start_munge
  /usr/sbin/slurmctld          # daemonizes; pid -> $CTLD_PID
  /usr/sbin/slurmd -N localhost
  local t1=$SECONDS st=""
  while (( SECONDS - t1 < READY_TIMEOUT )); do
    st=$(sinfo -h -n localhost -o %T 2>/dev/null | head -1 || true)
    [ "$st" = idle ] && scontrol ping 2>/dev/null | grep -q UP && break
    sleep 0.1
  done
  if [ "$st" != idle ]; then
    tail -20 $LOGS/slurmctld.log $LOGS/slurmd.log >&2 || true
    die "node not idle after ${READY_TIMEOUT}s (state='$st')"
  fi
  log "cluster up in $((SECONDS - t0)) s: slurmctld pid $(cat $CTLD_PID), slurmd pid $(cat $SLURMD_PID)"
  sinfo >&2
}

stop_pidfiles() {  # stop_pidfiles PIDFILE... : SIGTERM all at once, wait up to 10 s, then SIGKILL
  local pf p i alive pids=()
  for pf in "$@"; do if pid_alive "$pf"; then pids+=("$(cat "$pf")"); kill -TERM "$(cat "$pf")"; fi; done
  for i in $(seq 1 100); do
    alive=0; for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break; sleep 0.1
  done
  for p in "${pids[@]}"; do if kill -0 "$p" 2>/dev/null; then log "pid $p ignored SIGTERM, sending SIGKILL"; kill -KILL "$p"; fi; done
  rm -f "$@"
  [ ${#pids[@]} -gt 0 ] && log "stopped pids ${pids[*]} ($*)"
  return 0
}

jobs_left() { [ -n "$(squeue -h -o %i 2>/dev/null)" ]; }

do_down() {
  local t0=$SECONDS i pids
  if pid_alive $CTLD_PID && jobs_left; then
    squeue -h -o %i | xargs -r scancel
    # slurmstepd sends SIGCONT+SIGTERM now and SIGKILL after KillWait; don't wait that long
    for i in $(seq 1 $(( DOWN_GRACE * 5 ))); do jobs_left || break; sleep 0.2; done
    for i in $(seq 1 50); do
      jobs_left || break
      # PIDs of processes still belonging to jobs on this node (as tracked by slurmstepd)
      pids=$(scontrol listpids 2>/dev/null | awk 'NR>1 && $1 ~ /^[0-9]+$/ {print $1}' || true)
      if [ -n "$pids" ]; then log "SIGKILL leftover job pids: $(echo $pids)"; kill -KILL $pids 2>/dev/null || true; fi
      sleep 0.2
    done
    if jobs_left; then log "WARN: jobs still present at shutdown: $(squeue -h -o '%i %T' | tr '\n' ' ')"; fi
  fi
  log "jobs drained after $((SECONDS - t0)) s"
  stop_pidfiles "$SLURMD_PID" "$CTLD_PID"
  stop_pidfiles "$MUNGE_PID"
  # empty cgroup-v1 dirs left by proctrack/cgroup
  for d in /sys/fs/cgroup/*/slurm_localhost /sys/fs/cgroup/*/slurm; do
    if [ -d "$d" ]; then find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null || true; fi
  done
  log "down in $((SECONDS - t0)) s"
}

do_status() { scontrol ping; sinfo; squeue; }

do_wait() {  # do_wait JOBID [TIMEOUT]
  local j=$1 to=${2:-600} t0=$SECONDS st
  while :; do
    st=$(scontrol show job "$j" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p')
    case "$st" in
      COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|PREEMPTED|DEADLINE|BOOT_FAIL) break;;
      "") st=UNKNOWN; break;;   # purged (older than MinJobAge): see $LOGS/jobcomp.log
    esac
    (( SECONDS - t0 >= to )) && { echo "TIMEOUT_WAITING ($st)"; return 2; }
    sleep 0.2
  done
  echo "$st"; [ "$st" = COMPLETED ]
}

case "${1:-}" in
  up) do_up;;
  down) do_down;;
  status) do_status;;
  install) do_install;;
  wait) shift; do_wait "$@";;
  *) echo "usage: $0 {up|down|status|install|wait JOBID [TIMEOUT]}" >&2; exit 2;;
esac
