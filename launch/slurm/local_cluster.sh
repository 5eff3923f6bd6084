#!/usr/bin/env bash
# A real Slurm cluster on localhost (one node, or several), for tests and for trying
# launch/slurm/ out.
#
#   launch/slurm/local_cluster.sh start DIR [NODES]   install (Debian, as root) and start munged,
#                                                     slurmctld and NODES slurmd daemons (default 1)
#   launch/slurm/local_cluster.sh stop DIR            stop the daemons started from DIR
#
# Everything lives under DIR: slurm.conf, state, spool, logs, pid files. Clients must see
# SLURM_CONF=DIR/slurm.conf (printed on success). One node is named after this host. With
# NODES > 1 the nodes are megalm-n1..megalm-nN, one `slurmd -N megalm-nI` each on its own
# port (Debian's slurmd is built with multiple-slurmd support), all NodeAddr=127.0.0.1:
# their names do not resolve, so jobs see a real multi-node allocation (SLURM_NODEID,
# SLURM_STEP_NODELIST=megalm-n[1-2], ...) and megalm takes the master address from the
# first node's NodeAddr. Every node gets every CPU of the machine (they share it),
# proctrack/linuxproc and task/none (no cgroups needed, so it runs in containers), and
# JobRequeue=1 so `#SBATCH --requeue` jobs can be requeued.
# Environment: SLURMCTLD_PORT (6817), SLURMD_PORT (6818; node I listens on SLURMD_PORT+I-1),
# SLURM_FIRST_JOB_ID (1; job ids derive MASTER_PORT, so two clusters on one machine should
# start apart). Exit codes: 0 started, 3 cannot run here (not root, no apt-get, install
# failed: the reason is on stderr), 1 started but not healthy (logs are printed), 2 usage.
set -euo pipefail

usage="usage: $0 start DIR [NODES] | stop DIR"
cmd=${1:?$usage}
dir=$(realpath -m "${2:?$usage}")
nodes=${3:-1}
[[ $nodes =~ ^[1-9][0-9]*$ ]] || { echo "$usage (NODES: a positive integer, not '$nodes')" >&2; exit 2; }
conf="$dir/slurm.conf"

stop() {
    local pidfile pid
    for pidfile in "$dir"/slurmd*.pid "$dir/slurmctld.pid" "$dir/munged.pid"; do
        [[ -f $pidfile ]] || continue
        pid=$(cat "$pidfile")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
        rm -f "$pidfile"
    done
}

# NodeName lines and the names of the nodes (one per slurmd).
node_lines() {
    local cpus=$1 mem=$2 port=${SLURMD_PORT:-6818} i
    if ((nodes == 1)); then
        echo "NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN"
        return
    fi
    for i in $(seq "$nodes"); do
        echo "NodeName=megalm-n$i NodeHostname=$host NodeAddr=127.0.0.1 Port=$((port + i - 1))" \
            "CPUs=$cpus RealMemory=$mem State=UNKNOWN"
    done
}

node_names() {
    if ((nodes == 1)); then echo "$host"; else seq -f "megalm-n%g" "$nodes"; fi
}

cant() { echo "local_cluster: $*" >&2; exit 3; }

install() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && return
    [[ $(id -u) == 0 ]] || cant "slurm-wlm/munge are not installed and this is not root"
    command -v apt-get >/dev/null || cant "slurm-wlm/munge are not installed and there is no apt-get"
    export DEBIAN_FRONTEND=noninteractive
    timeout 300 apt-get update -qq >"$dir/apt.log" 2>&1 || cant "apt-get update failed: $(tail -3 "$dir/apt.log")"
    timeout 600 apt-get install -y -qq slurm-wlm munge >>"$dir/apt.log" 2>&1 ||
        cant "apt-get install slurm-wlm munge failed: $(tail -3 "$dir/apt.log")"
}

start() {
    [[ $(id -u) == 0 ]] || cant "the local cluster runs its daemons as root; this is uid $(id -u)"
    mkdir -p "$dir"/{state,spool,munge}
    install
    stop
    host=$(hostname -s)
    cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # GNU nproc honours OMP_NUM_THREADS
    mem=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2))
    cat >"$conf" <<EOF
ClusterName=megalm-local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobRequeue=1
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd-%n.log
FirstJobId=${SLURM_FIRST_JOB_ID:-1}
KillWait=30
MinJobAge=600
$(node_lines "$cpus" "$mem")
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
    export SLURM_CONF="$conf"
    # munged: its own socket/pid/log under DIR so a system munged (if any) is left alone.
    key=/etc/munge/munge.key
    if [[ ! -s $key ]]; then
        mkdir -p /etc/munge
        (command -v mungekey >/dev/null && mungekey --create --keyfile="$key") ||
            dd if=/dev/urandom of="$key" bs=1 count=1024 status=none
        chmod 400 "$key"
    fi
    munged --force --socket="$dir/munge/munge.socket" --pid-file="$dir/munged.pid" \
        --log-file="$dir/munged.log" --seed-file="$dir/munge/seed" --key-file="$key"
    # Slurm's auth/munge plugin reads the socket path from AuthInfo.
    sed -i "s|^AuthType=auth/munge|AuthType=auth/munge\nAuthInfo=socket=$dir/munge/munge.socket|" "$conf"
    slurmctld -i -f "$conf"
    for name in $(node_names); do
        mkdir -p "$dir/spool/$name"
        slurmd -f "$conf" -N "$name"
    done
    for _ in $(seq 60); do
        if state=$(sinfo -h -N -o %T 2>/dev/null) && (($(grep -c '^idle' <<<"$state") == nodes)); then
            echo "SLURM_CONF=$conf"
            return 0
        fi
        sleep 0.5
    done
    echo "local_cluster: $nodes node(s) did not become idle in 30 s (sinfo: ${state:-none})" >&2
    tail -n 20 "$dir"/*.log >&2 || true
    return 1
}

case $cmd in
start) start ;;
stop) stop ;;
*) echo "$usage" >&2; exit 2 ;;
esac
