#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for the slurm test tier.
#
#   bash scripts/slurm-cluster.sh start    install (as root, if missing) and start
#   bash scripts/slurm-cluster.sh stop     stop the daemons this script started
#   bash scripts/slurm-cluster.sh status   exit 0 when the node answers and is usable
#
# What `start` does (Debian/Ubuntu, root):
#   - apt-get install slurm-wlm munge when slurmctld/slurmd/munged are missing;
#   - writes /etc/munge/munge.key (0400, owned by munge) when missing and starts munged
#     as the munge user;
#   - writes /etc/slurm/slurm.conf and /etc/slurm/gres.conf for one node named
#     `hostname -s` with CPUs=`nproc`, RealMemory below the machine's, partitions `cpu`
#     (default) and `gpu`, one GRES gpu backed by /dev/null (so `--gpus=1` jobs are
#     accepted on machines without a GPU), no accounting and no cgroup.conf;
#   - starts slurmctld and slurmd and waits until `sinfo` shows the node idle.
# It is idempotent: when the cluster already answers, it is left alone.
# It refuses to replace a slurm.conf it did not write (set CONVEYOR_SLURM_FORCE=1 to
# replace it anyway; the old file is kept as slurm.conf.conveyor-backup).
#
# Environment:
#   CONVEYOR_SLURM_WAIT   seconds to wait for the node to become idle (default 90)
#   CONVEYOR_SLURM_FORCE  1 = replace a foreign /etc/slurm/slurm.conf
set -euo pipefail

MARKER="# written by conveyor scripts/slurm-cluster.sh"
SLURM_ETC=/etc/slurm
CONF="$SLURM_ETC/slurm.conf"
GRES_CONF="$SLURM_ETC/gres.conf"
LOG_DIR=/var/log/slurm
CTLD_LOG="$LOG_DIR/slurmctld.log"
SLURMD_LOG="$LOG_DIR/slurmd.log"
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_PID=/run/munge/munged.pid
MUNGE_KEY=/etc/munge/munge.key
WAIT_S="${CONVEYOR_SLURM_WAIT:-90}"

HOST="$(hostname -s)"

say() { echo "slurm-cluster: $*" >&2; }
die() { say "error: $*"; exit 1; }

log_tail() {
    local f
    for f in "$CTLD_LOG" "$SLURMD_LOG" /var/log/munge/munged.log; do
        if [ -r "$f" ]; then
            echo "---- last lines of $f ----" >&2
            tail -n 25 "$f" >&2 || true
        fi
    done
}

is_root() { [ "$(id -u)" -eq 0 ]; }

sbin() {
    # path of a daemon binary (not always in a non-root PATH)
    local name="$1" d
    for d in /usr/sbin /usr/local/sbin /sbin; do
        if [ -x "$d/$name" ]; then echo "$d/$name"; return 0; fi
    done
    command -v "$name" 2>/dev/null || return 1
}

pid_alive() {
    # pid_alive PIDFILE: the process named in PIDFILE is running
    local pidfile="$1" pid
    [ -r "$pidfile" ] || return 1
    pid="$(tr -dc '0-9' <"$pidfile")"
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

node_state() {
    sinfo -h -N -n "$HOST" -o '%T' 2>/dev/null | head -n 1 | tr -d '*~#!%$@^-'
}

cluster_up() {
    command -v sinfo >/dev/null 2>&1 || return 1
    scontrol ping 2>/dev/null | grep -q 'is UP' || return 1
    case "$(node_state)" in
        idle | mixed | allocated | completing) return 0 ;;
        *) return 1 ;;
    esac
}

install_packages() {
    if sbin slurmctld >/dev/null && sbin slurmd >/dev/null && sbin munged >/dev/null \
        && command -v sbatch >/dev/null; then
        return 0
    fi
    command -v apt-get >/dev/null 2>&1 || die "slurm-wlm and munge are missing and there is no apt-get"
    say "installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null \
        || die "apt-get install slurm-wlm munge failed"
}

start_munge() {
    if pid_alive "$MUNGE_PID" && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0
    fi
    id munge >/dev/null 2>&1 || die "user munge does not exist (is the munge package installed?)"
    mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
    if [ ! -s "$MUNGE_KEY" ]; then
        say "writing $MUNGE_KEY"
        dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge "$MUNGE_KEY" /run/munge /var/lib/munge /var/log/munge
    chmod 0700 /etc/munge
    chmod 0400 "$MUNGE_KEY"
    chmod 0755 /run/munge
    rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock "$MUNGE_PID"
    say "starting munged as munge"
    runuser -u munge -- "$(sbin munged)" --force \
        || die "munged did not start"
    local i
    for i in $(seq 1 20); do
        if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
        sleep 0.5
    done
    log_tail
    die "munge credentials cannot be decoded (munged not working)"
}

write_config() {
    mkdir -p "$SLURM_ETC" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd
    if [ -e "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
        if [ "${CONVEYOR_SLURM_FORCE:-0}" = 1 ]; then
            cp -p "$CONF" "$CONF.conveyor-backup"
            say "replacing $CONF (old one kept as $CONF.conveyor-backup)"
        else
            die "$CONF exists and was not written by this script; set CONVEYOR_SLURM_FORCE=1 to replace it"
        fi
    fi
    local cpus mem_total_mb real_mb
    cpus="$(nproc)"
    mem_total_mb="$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)"
    # leave room for the OS and the daemons; never claim more than the machine has
    real_mb=$((mem_total_mb * 85 / 100))
    [ "$real_mb" -ge 500 ] || real_mb=500
    cat >"$CONF" <<EOF
$MARKER
# One node (this machine) for tests; no accounting (use squeue for job status).
ClusterName=conveyor
SlurmctldHost=${HOST}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=256
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
MinJobAge=600
SlurmctldTimeout=60
SlurmdTimeout=120
InactiveLimit=0
KillWait=10
Waittime=0
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$CTLD_LOG
SlurmdLogFile=$SLURMD_LOG
SlurmctldPort=6817
SlurmdPort=6818
GresTypes=gpu
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$real_mb Gres=gpu:1 State=UNKNOWN
PartitionName=cpu Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$HOST Default=NO MaxTime=INFINITE State=UP
EOF
    cat >"$GRES_CONF" <<EOF
$MARKER
NodeName=$HOST Name=gpu File=/dev/null Count=1
EOF
    chmod 0644 "$CONF" "$GRES_CONF"
}

start_daemons() {
    if ! pid_alive "$CTLD_PID"; then
        say "starting slurmctld"
        # -c: ignore state left by an earlier run (jobs, node states)
        "$(sbin slurmctld)" -c || { log_tail; die "slurmctld did not start"; }
    fi
    local i
    for i in $(seq 1 30); do
        if scontrol ping 2>/dev/null | grep -q 'is UP'; then break; fi
        sleep 1
    done
    scontrol ping 2>/dev/null | grep -q 'is UP' || { log_tail; die "slurmctld does not answer"; }
    if ! pid_alive "$SLURMD_PID"; then
        say "starting slurmd"
        "$(sbin slurmd)" || { log_tail; die "slurmd did not start"; }
    fi
}

wait_idle() {
    local i state=""
    for i in $(seq 1 "$WAIT_S"); do
        state="$(node_state)"
        case "$state" in
            idle | mixed | allocated | completing) say "node $HOST is $state"; return 0 ;;
            down | drained | draining | fail | failing | inval)
                # ReturnToService=2 normally brings it back; help once it registered
                scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 1
    done
    say "node $HOST did not become idle within ${WAIT_S}s (state: ${state:-unknown})"
    sinfo -N -l 2>&1 | sed 's/^/  /' >&2 || true
    log_tail
    return 1
}

cmd_start() {
    if cluster_up; then
        say "already running (node $HOST is $(node_state))"
        return 0
    fi
    is_root || die "not running as root: cannot install or start SLURM (run as root, or start the cluster yourself)"
    install_packages
    start_munge
    if [ ! -e "$CONF" ] || grep -qF "$MARKER" "$CONF" || [ "${CONVEYOR_SLURM_FORCE:-0}" = 1 ]; then
        if ! pid_alive "$CTLD_PID"; then
            write_config
        fi
    else
        die "$CONF exists and was not written by this script; set CONVEYOR_SLURM_FORCE=1 to replace it"
    fi
    start_daemons
    wait_idle || die "the cluster did not come up"
    sinfo >&2 || true
}

stop_pidfile() {
    local name="$1" pidfile="$2" pid i
    if pid_alive "$pidfile"; then
        pid="$(tr -dc '0-9' <"$pidfile")"
        say "stopping $name (pid $pid)"
        kill "$pid" 2>/dev/null || true
        for i in $(seq 1 20); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.5
        done
        if kill -0 "$pid" 2>/dev/null; then
            kill -9 "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$pidfile"
}

cmd_stop() {
    # stop only daemons running with our configuration (their pid files)
    if [ -e "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
        die "$CONF was not written by this script; not stopping a cluster it did not start"
    fi
    stop_pidfile slurmd "$SLURMD_PID"
    stop_pidfile slurmctld "$CTLD_PID"
    stop_pidfile munged "$MUNGE_PID"
}

cmd_status() {
    if cluster_up; then
        say "up: node $HOST is $(node_state)"
        sinfo >&2 || true
        return 0
    fi
    say "down"
    return 1
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    restart) cmd_stop; cmd_start ;;
    *)
        echo "usage: $0 start|stop|status|restart" >&2
        exit 2
        ;;
esac
