#!/usr/bin/env bash
# A real single-node SLURM (Debian's 22.05) on this machine, for the Snakemake SLURM-executor test
# (workflow/profiles/slurm-ci) locally and in CI. Needs root or sudo.
#   local-slurm.sh install   apt-get slurmctld slurmd slurm-client munge (if slurmctld is missing)
#   local-slurm.sh start     write /etc/slurm/slurm.conf, start munged (if none runs), slurmctld, slurmd
#   local-slurm.sh stop      stop exactly the daemons `start` started, remove the slurm.conf it wrote
#   local-slurm.sh status    exit 0 if the cluster `start` started is up
# State, logs, pid files and the job-completion log (read by `sacct -c`) live in MINDVIS_SLURM_DIR; the node
# has MINDVIS_SLURM_CPUS CPUs (default: the core count).
set -euo pipefail

STATE=${MINDVIS_SLURM_DIR:-/var/tmp/mindvis-slurm}
# The compiled-in path, not SLURM_CONF: the job-step plugin drops every SLURM_* variable before srun.
CONF=/etc/slurm/slurm.conf
MARK="# written by mindvis local-slurm.sh"
MUNGE_KEY=/etc/munge/munge.key
PACKAGES=(slurmctld slurmd slurm-client munge)
NODE=$(hostname -s)
SELF=$(readlink -f "$0")
START_TIMEOUT=60

say() { echo "local-slurm: $*"; }
die() { echo "local-slurm: error: $*" >&2; exit 1; }

# Re-run this script as root (sudo only when not root), keeping the state directory.
need_root() {
    [ "$(id -u)" -eq 0 ] || exec sudo env MINDVIS_SLURM_DIR="$STATE" "$SELF" "$@"
}

# alive NAME: the pid in $STATE/NAME.pid is running and is NAME (guards against a reused pid).
alive() {
    local f=$STATE/$1.pid pid
    [ -s "$f" ] || return 1
    pid=$(<"$f")
    [[ $pid =~ ^[0-9]+$ ]] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ]
}

ours_conf() { [ -f "$CONF" ] && grep -qxF "$MARK" "$CONF"; }

log_tails() {
    local f
    for f in "$STATE/slurmctld.log" "$STATE/slurmd.log" /var/log/munge/munged.log; do
        [ -s "$f" ] || continue
        echo "----- last lines of $f" >&2
        tail -n 20 "$f" >&2
    done
}

fail_start() {
    echo "local-slurm: error: $*" >&2
    log_tails
    echo "local-slurm: pid files are kept in $STATE; run '$SELF stop' to clean up" >&2
    exit 1
}

cmd_install() {
    if command -v slurmctld >/dev/null; then
        say "SLURM already installed ($(slurmctld -V))"
        return 0
    fi
    local sudo=
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${PACKAGES[@]}"
}

munge_works() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if [ ! -s "$MUNGE_KEY" ]; then
        install -d -o munge -g munge -m 0700 "$(dirname "$MUNGE_KEY")"
        (umask 077 && head -c 1024 /dev/urandom >"$MUNGE_KEY")
        chown munge:munge "$MUNGE_KEY"
        chmod 0400 "$MUNGE_KEY"
        say "wrote $MUNGE_KEY"
    fi
    if alive munged || munge_works; then
        alive munged || say "munged already runs (not started here; stop leaves it)"
        return 0
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    runuser -u munge -- munged  # forks itself; its pid file is /run/munge/munged.pid
    local i
    for i in $(seq 100); do
        if [ -s /run/munge/munged.pid ]; then
            cp /run/munge/munged.pid "$STATE/munged.pid"
            munge_works && return 0
        fi
        sleep 0.1
    done
    fail_start "munged did not come up"
}

write_conf() {
    local cpus mem_mb def_mem
    # MINDVIS_SLURM_CPUS above the core count lets more one-thread jobs run at once: the test workflow's jobs
    # spend most of their time starting Python and waiting for status polls, not computing.
    cpus=${MINDVIS_SLURM_CPUS:-$(nproc)}
    # A bit below the machine's memory: slurmd drains a node that has less than RealMemory.
    mem_mb=$(awk '/^MemTotal:/ { printf "%d", $2 / 1024 * 0.9 }' /proc/meminfo)
    def_mem=$((mem_mb / cpus < 1024 ? mem_mb / cpus : 1024))
    mkdir -p "$(dirname "$CONF")"
    cat >"$CONF.tmp" <<EOF
$MARK
# $(date -Is); '$SELF stop' stops this cluster and removes this file.
ClusterName=mindvis-ci
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
# No cgroups: plain /proc process tracking, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without it a job that asks for no memory takes the whole node.
DefMemPerCPU=$def_mem
# No slurmdbd: finished jobs go to a text file, which 'sacct -c' reads.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/jobcomp.log
# squeue keeps finished jobs this long: well above Snakemake's status-check delays.
MinJobAge=300
ReturnToService=2
# Trust the CPU count above even where it exceeds the cores (MINDVIS_SLURM_CPUS).
SlurmdParameters=config_overrides
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    chmod 0644 "$CONF.tmp"
    mv "$CONF.tmp" "$CONF"
}

cluster_state() { timeout 10 sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n 1; }

cmd_status() {
    local state
    if ! ours_conf || ! alive slurmctld || ! alive slurmd; then
        say "down"
        return 1
    fi
    state=$(cluster_state) || true
    case $state in
        idle | mixed | allocated | completing)
            say "up (node $NODE $state)"
            ;;
        *)
            say "not ready (node $NODE: ${state:-no answer})"
            return 1
            ;;
    esac
}

cmd_start() {
    need_root start
    command -v slurmctld >/dev/null || die "SLURM is not installed: run '$SELF install'"
    if [ -e "$CONF" ] && ! ours_conf; then
        die "$CONF exists and was not written by this script; move it away to use this test cluster"
    fi
    if cmd_status >/dev/null 2>&1; then
        say "already up ($STATE)"
        return 0
    fi
    # A half-started cluster from before: clean it up first.
    cmd_stop >/dev/null
    local t0 i state
    t0=$(date +%s.%N)
    mkdir -p "$STATE/slurmctld" "$STATE/slurmd"
    chmod 0755 "$STATE"
    start_munge
    write_conf
    # Both fork themselves and write their pid files into $STATE.
    slurmctld || fail_start "slurmctld failed to start"
    slurmd || fail_start "slurmd failed to start"
    local deadline=$((SECONDS + START_TIMEOUT))
    for ((i = 0; SECONDS < deadline; i++)); do
        state=$(cluster_state) || true
        [ "$state" = idle ] && break
        if ((i >= 8)) && ! { alive slurmctld && alive slurmd; }; then
            fail_start "$(alive slurmctld || echo "slurmctld ")$(alive slurmd || echo "slurmd ")exited"
        fi
        sleep 0.25
    done
    [ "$state" = idle ] || fail_start "node $NODE is '${state:-unknown}', not idle, after ${START_TIMEOUT}s"
    alive slurmctld && alive slurmd || fail_start "a daemon exited"
    timeout 30 srun -N1 true || fail_start "'srun -N1 true' failed"
    say "up: node $NODE, partition debug, state in $STATE; started in $(awk -v t0="$t0" -v t1="$(date +%s.%N)" 'BEGIN { printf "%.1f", t1 - t0 }') s"
}

# stop_one NAME: stop the daemon whose pid is in $STATE/NAME.pid (if it is still NAME) and wait for it.
stop_one() {
    local f=$STATE/$1.pid pid i
    [ -e "$f" ] || return 0
    if alive "$1"; then
        pid=$(<"$f")
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 150; i++)); do
            [ -d "/proc/$pid" ] || break
            sleep 0.2
        done
        if [ -d "/proc/$pid" ]; then
            say "$1 ($pid) ignored SIGTERM for 30 s, sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.5
        fi
        say "stopped $1 ($pid)"
    fi
    rm -f "$f"
}

cmd_stop() {
    need_root stop
    local i
    if alive slurmctld; then
        # Cancel leftover jobs so no slurmstepd outlives slurmd.
        timeout 10 squeue -h -o %A 2>/dev/null | xargs -r timeout 10 scancel 2>/dev/null || true
        for ((i = 0; i < 40; i++)); do
            [ -z "$(timeout 10 squeue -h -t RUNNING,COMPLETING -o %A 2>/dev/null)" ] && break
            sleep 0.25
        done
    fi
    stop_one slurmd
    stop_one slurmctld
    stop_one munged
    if ours_conf; then
        rm -f "$CONF"
        say "removed $CONF"
    fi
}

case ${1:-} in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *)
        echo "usage: $0 install|start|stop|status" >&2
        exit 2
        ;;
esac
