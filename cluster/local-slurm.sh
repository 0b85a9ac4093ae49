#!/usr/bin/env bash
# local-slurm.sh — a throw-away SLURM (Debian 12 / SLURM 22.05) on this one
# machine, so the project's SLURM profile can be exercised on a laptop or in the
# test suite without a real cluster: one node, or several nodes (node1, node2,
# ...), each slurmd in its own network, UTS and mount namespace on a bridge that
# only they and slurmctld (on the bridge's address) are on.
#
# Usage:
#   local-slurm.sh install              # apt packages (idempotent)
#   eval "$(local-slurm.sh start DIR)"  # start munged+slurmctld+slurmd, prints exports
#   local-slurm.sh status DIR           # exit 0 iff all daemons are alive
#   local-slurm.sh stop DIR             # stop everything started for DIR
#
# Tunables (environment):
#   LOCAL_SLURM_TIMEOUT     seconds to wait for the nodes to become idle (60)
#   LOCAL_SLURM_NODES       number of nodes (1); more need ip netns and unshare
#   LOCAL_SLURM_GPUS        number of fake GPUs on each node (1)
#   LOCAL_SLURM_CTLD_PORT   slurmctld port (6817)
#   LOCAL_SLURM_SLURMD_PORT slurmd port (6818)
#   LOCAL_SLURM_MIN_JOB_AGE MinJobAge in seconds (600)
#
# All messages go to stderr; stdout of `start` carries only `export X=Y` lines
# (with several nodes: LOCAL_SLURM_IFNAME, the interface each node's jobs are on).
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge)
PARTITION=debug
# The interface each namespaced node's jobs are on (the same name in every node).
NODE_IFNAME=slurm0
# The one file outside STATE_DIR we touch; see write_etc_link for why.
ETC_CONF=/etc/slurm/slurm.conf
STARTED=()

log() { printf 'local-slurm: %s\n' "$*" >&2; }
die() { printf 'local-slurm: ERROR: %s\n' "$*" >&2; exit 1; }
die_log() { # die_log LOGFILE MESSAGE: the cause is nearly always in the log's tail
    local logfile=$1
    shift
    if [[ -s $logfile ]]; then
        printf 'local-slurm: last lines of %s:\n' "$logfile" >&2
        tail -n 5 "$logfile" | sed 's/^/    /' >&2
    fi
    die "$@"
}

usage() {
    sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

need_root() {
    # The daemons run as root (SlurmUser=root) and munged must be started as
    # the munge user; neither is possible for an unprivileged caller.
    [[ $(id -u) -eq 0 ]] || die "must run as root (try: sudo $0 $*)"
}

# ---------------------------------------------------------------- install ----
is_installed() {
    local st
    st=$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) || return 1
    [[ $st == 'install ok installed' ]]
}

cmd_install() {
    need_root install
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        is_installed "$p" || missing+=("$p")
    done
    if ((${#missing[@]} == 0)); then
        log "packages already installed: ${PACKAGES[*]}"
        return 0
    fi
    log "installing: ${missing[*]}"
    # A fresh machine may have no or stale package lists; without update the
    # install fails with 404s rather than a clear message.
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >&2
    for p in "${PACKAGES[@]}"; do
        is_installed "$p" || die "package $p did not install"
    done
    log "installed"
}

# ------------------------------------------------------------------ paths ----
set_paths() {
    [[ $# -ge 1 && -n $1 ]] || die "STATE_DIR argument required"
    # Canonical, so the /etc link and the process marker compare equal no
    # matter how the caller spelled the path; -m because stop/status must
    # work on a state dir that was deleted under running daemons.
    STATE_DIR=$(realpath -m -- "$1")
    CONF=$STATE_DIR/slurm.conf
    GRES_CONF=$STATE_DIR/gres.conf
    RUN_DIR=$STATE_DIR/run
    LOG_DIR=$STATE_DIR/log
    CTLD_STATE=$STATE_DIR/ctld
    FAKE_DEV=$STATE_DIR/dev
    # munged insists on a private dir for its key and a world-searchable,
    # not-world-writable dir for its socket, so they are kept apart.
    MUNGE_DIR=$STATE_DIR/munge
    MUNGE_SOCK_DIR=$STATE_DIR/munge-sock
    MUNGE_SOCK=$MUNGE_SOCK_DIR/munge.socket.2
    MUNGE_KEY=$MUNGE_DIR/munge.key
    MUNGED_PID=$MUNGE_DIR/munged.pid
    CTLD_PID=$RUN_DIR/slurmctld.pid
    # What start chose, so that status and stop find every node whatever
    # their caller's environment says.
    NODES_FILE=$STATE_DIR/nodes
    HOSTS_FILE=$STATE_DIR/hosts
    NODE_ETC=$STATE_DIR/etc
    set_nodes
}

set_nodes() {
    local count i tag
    if [[ -s $NODES_FILE ]]; then
        count=$(wc -l <"$NODES_FILE")
    else
        count=${LOCAL_SLURM_NODES:-1}
    fi
    [[ $count =~ ^[1-9][0-9]*$ ]] || die "LOCAL_SLURM_NODES must be a positive number"
    NODES=() NETNS=()
    if ((count == 1)); then
        NODES=(localhost)
        CTLD_ADDR=127.0.0.1
        NODE_ADDRS=(127.0.0.1)
        return 0
    fi
    # Names of the bridge, veths and namespaces from the state dir, so two
    # instances (or a crashed one's leftovers) never share them.
    tag=$(($(cksum <<<"$STATE_DIR" | cut -d' ' -f1) % 65536))
    BRIDGE=$(printf 'lsbr%04x' "$tag")
    SUBNET=10.217.$((tag % 256))
    CTLD_ADDR=$SUBNET.1
    NODE_ADDRS=() VETHS=()
    for ((i = 1; i <= count; i++)); do
        NODES+=("node$i")
        NODE_ADDRS+=("$SUBNET.$((i + 1))")
        NETNS+=("$(printf 'local-slurm-%04x-node%d' "$tag" "$i")")
        VETHS+=("$(printf 'lsv%04x-%d' "$tag" "$i")")
    done
}

namespaced() { ((${#NODES[@]} > 1)); }

slurmd_pidfile() { printf '%s/slurmd-%s.pid\n' "$RUN_DIR" "$1"; }

# ------------------------------------------------------------ pid helpers ----
# Prints the pid from FILE if it names a live process whose command line
# mentions NAME; guards against a stale pid file matching a recycled pid.
live_pid() {
    local file=$1 name=$2 pid cmdline
    [[ -s $file ]] || return 1
    pid=$(tr -dc '0-9' <"$file")
    [[ -n $pid ]] || return 1
    # A zombie has an empty cmdline and is as good as gone. (Read into a
    # variable rather than `| grep -q`: under pipefail an early-exiting grep
    # can turn a match into a SIGPIPE failure.)
    cmdline=$({ tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null) || return 1
    [[ $cmdline == *"$name"* ]] || return 1
    printf '%s\n' "$pid"
}

wait_gone() { # wait_gone SECONDS PID...
    local deadline=$((SECONDS + $1)) pid alive cmdline
    shift
    while :; do
        alive=0
        for pid in "$@"; do
            # /proc files always stat as size 0, so read instead of `-s`;
            # an empty cmdline means zombie (or gone), i.e. done.
            cmdline=$({ tr -d '\0' <"/proc/$pid/cmdline"; } 2>/dev/null) || cmdline=
            [[ -n $cmdline ]] && alive=1
        done
        ((alive == 0)) && return 0
        ((SECONDS >= deadline)) && return 1
        sleep 0.2
    done
}

# Processes that carry our marker in their environment: the daemons and
# the slurmstepd's they fork (which outlive slurmd and have no pid file).
marked_pids() {
    local env_file pid environ cmdline
    for env_file in /proc/[0-9]*/environ; do
        pid=${env_file#/proc/}
        pid=${pid%/environ}
        environ=$({ tr '\0' '\n' <"$env_file"; } 2>/dev/null) || continue
        [[ $'\n'$environ$'\n' == *$'\n'"LOCAL_SLURM_STATE_DIR=$STATE_DIR"$'\n'* ]] || continue
        # The caller (and its jobs) may carry the exported marker too; only
        # daemons are ours to kill.
        cmdline=$({ tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null) || continue
        case $cmdline in
        slurmctld* | slurmd* | slurmstepd* | munged* | *slurmscriptd* | */slurmctld* | */slurmd* | */munged*)
            printf '%s\n' "$pid"
            ;;
        esac
    done
}

# ----------------------------------------------------------------- config ----
node_hw() {
    # slurmd -C reports what slurmd will register with; configuring more than
    # that makes slurmctld drain the node ("Low RealMemory"/"Low CPUs").
    local line
    line=$(slurmd -C 2>/dev/null) || true
    line=${line%%$'\n'*}
    HW_CPUS=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$line")
    HW_MEM=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$line")
    [[ -n $HW_CPUS ]] || HW_CPUS=$(nproc)
    [[ -n $HW_MEM ]] || HW_MEM=$(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo)
}

write_config() {
    local gpus=${LOCAL_SLURM_GPUS:-1} ctld_port=${LOCAL_SLURM_CTLD_PORT:-6817}
    local slurmd_port=${LOCAL_SLURM_SLURMD_PORT:-6818} min_job_age=${LOCAL_SLURM_MIN_JOB_AGE:-600}
    [[ $gpus =~ ^[0-9]+$ ]] || die "LOCAL_SLURM_GPUS must be a number"
    node_hw
    mkdir -p "$RUN_DIR" "$LOG_DIR" "$CTLD_STATE" "$FAKE_DEV"
    local node
    for node in "${NODES[@]}"; do
        mkdir -p "$STATE_DIR/slurmd-$node"
    done

    local gres_node="" gres_types="" i files=()
    if ((gpus > 0)); then
        # slurmd drops a gpu gres that has no File= (and then drains the
        # node), and complains about a File= that is not a device node (and
        # then sets no CUDA_VISIBLE_DEVICES in jobs). Clones of /dev/null
        # (char 1:3) stand in for /dev/nvidiaN: with task/none nothing opens
        # or constrains them, a distinct path per fake GPU is all that
        # --gpus=N needs.
        for ((i = 0; i < gpus; i++)); do
            if [[ ! -c $FAKE_DEV/gpu$i ]]; then
                rm -f "$FAKE_DEV/gpu$i"
                mknod -m 0666 "$FAKE_DEV/gpu$i" c 1 3
            fi
            files+=("$FAKE_DEV/gpu$i")
        done
        gres_node=" Gres=gpu:$gpus"
        gres_types="GresTypes=gpu"
    fi

    cat >"$CONF" <<EOF
# Generated by local-slurm.sh — a SLURM of ${#NODES[@]} node(s) for local testing.
ClusterName=localslurm
# slurmctld accepts "localhost" as its own name; nodes reach it at the address.
SlurmctldHost=localhost($CTLD_ADDR)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
# Everything runs as root: no slurm user, no per-user spool permissions.
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Our own munged, not the system one (which may not exist or run).
AuthInfo=socket=$MUNGE_SOCK
StateSaveLocation=$CTLD_STATE
# %n: the node's name, so each slurmd of a several-node rig keeps its own.
SlurmdSpoolDir=$STATE_DIR/slurmd-%n
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$RUN_DIR/slurmd-%n.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups in containers/VMs without systemd: track by process tree.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
# Cores only: with CR_*_Memory a job without --mem takes the whole node.
SelectTypeParameters=CR_Core
$gres_types
# snakemake-executor-plugin-slurm's squeue status mode needs finished jobs
# to stay visible (it falls back to sacct if MinJobAge < 3x its first poll).
MinJobAge=$min_job_age
# A node that was down/drained from a previous run comes back on registration.
ReturnToService=2
SlurmdTimeout=300
SlurmctldTimeout=120
InactiveLimit=0
KillWait=5
Waittime=0
EOF
    # Every node reports the whole machine: they share its CPUs and memory.
    for ((i = 0; i < ${#NODES[@]}; i++)); do
        echo "NodeName=${NODES[$i]} NodeAddr=${NODE_ADDRS[$i]} CPUs=$HW_CPUS RealMemory=$HW_MEM$gres_node State=UNKNOWN" >>"$CONF"
    done
    echo "PartitionName=$PARTITION Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP" >>"$CONF"

    : >"$GRES_CONF"
    for node in "${NODES[@]}"; do
        for ((i = 0; i < gpus; i++)); do
            echo "NodeName=$node Name=gpu File=${files[$i]}" >>"$GRES_CONF"
        done
    done
    printf '%s\n' "${NODES[@]}" >"$NODES_FILE"
}

# ---------------------------------------------------------------- network ----
# Several nodes: each slurmd in a network namespace of its own (its own
# address and ports; jobs on different nodes meet only over the bridge), a UTS
# one (its own hostname) and a mount one (an /etc/hosts naming every node, and
# /etc/slurm holding this config: see write_etc_link for why srun needs it
# there). No route leads off the bridge's subnet.
net_up() {
    local i
    net_down
    ip link add "$BRIDGE" type bridge
    ip addr add "$CTLD_ADDR/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    {
        echo "127.0.0.1 localhost"
        for ((i = 0; i < ${#NODES[@]}; i++)); do
            echo "${NODE_ADDRS[$i]} ${NODES[$i]}"
        done
    } >"$HOSTS_FILE"
    mkdir -p "$NODE_ETC" /etc/slurm
    ln -sfn "$CONF" "$NODE_ETC/slurm.conf"
    for ((i = 0; i < ${#NODES[@]}; i++)); do
        ip netns add "${NETNS[$i]}"
        ip link add "${VETHS[$i]}" type veth peer name "$NODE_IFNAME" netns "${NETNS[$i]}"
        ip link set "${VETHS[$i]}" master "$BRIDGE" up
        ip -n "${NETNS[$i]}" addr add "${NODE_ADDRS[$i]}/24" dev "$NODE_IFNAME"
        ip -n "${NETNS[$i]}" link set "$NODE_IFNAME" up
        ip -n "${NETNS[$i]}" link set lo up
    done
    log "nodes ${NODES[*]} at ${NODE_ADDRS[*]} on bridge $BRIDGE ($CTLD_ADDR)"
}

# Deleting a namespace deletes its end of the veth pair, and with it the other,
# once no process holds the namespace: a job's processes outlive a slurmstepd
# killed under them (a job stuck when the rig stops), and nothing but this rig
# runs in a node's namespace.
net_down() {
    local ns pids
    for ns in "${NETNS[@]}"; do
        ip netns list | grep -qw -- "$ns" || continue
        pids=$(ip netns pids "$ns" | tr '\n' ' ')
        if [[ -n ${pids// /} ]]; then
            log "killing processes left in $ns: $pids"
            # shellcheck disable=SC2086
            kill -KILL $pids 2>/dev/null || true
            # shellcheck disable=SC2086
            wait_gone 5 $pids || true
        fi
        ip netns del "$ns"
    done
    if ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link del "$BRIDGE"
    fi
}

# in_node INDEX: IN_NODE=(the prefix that runs a command inside the
# namespaces of node INDEX, from 0).
in_node() {
    IN_NODE=(nsenter --net="/run/netns/${NETNS[$1]}" unshare --uts --mount --propagation private
        sh -c 'hostname "$1" && mount --bind "$2" /etc/hosts && mount --bind "$3" /etc/slurm && shift 3 && exec "$@"'
        sh "${NODES[$1]}" "$HOSTS_FILE" "$NODE_ETC")
}

# snakemake-executor-plugin-slurm-jobstep strips every SLURM_* variable
# (SLURM_CONF included) before its inner `srun`, so that srun can only find
# the config at the compiled-in default path. Point that at ours.
write_etc_link() {
    mkdir -p "$(dirname "$ETC_CONF")"
    if [[ -L $ETC_CONF ]]; then
        ln -sfn "$CONF" "$ETC_CONF"
    elif [[ -e $ETC_CONF ]]; then
        log "WARNING: $ETC_CONF exists and is not ours; left alone."
        log "WARNING: srun inside jobs (snakemake's slurm-jobstep) will use it, not $CONF"
    else
        ln -s "$CONF" "$ETC_CONF"
    fi
}

check_other_instance() {
    # Two instances would fight over the /etc link and the ports; a link
    # left by a crashed instance is simply taken over later. Namespaced
    # nodes have /etc/slurm of their own.
    namespaced && return 0
    [[ -L $ETC_CONF ]] || return 0
    local other
    other=$(dirname "$(readlink "$ETC_CONF")")
    if [[ $other != "$STATE_DIR" ]] && live_pid "$other/run/slurmctld.pid" slurmctld >/dev/null; then
        die "another local SLURM is running from $other; run: $0 stop $other"
    fi
}

check_ports() {
    # A daemon that cannot bind only says so in its log after forking; catch
    # the usual cause (another slurm, or an instance whose state dir was
    # deleted under it) up front with a message that names it.
    command -v ss >/dev/null || return 0
    local name port pidfile var names=(slurmctld)
    # Namespaced slurmds bind in namespaces of their own.
    namespaced || names+=(slurmd)
    for name in "${names[@]}"; do
        if [[ $name == slurmctld ]]; then
            var=LOCAL_SLURM_CTLD_PORT port=${LOCAL_SLURM_CTLD_PORT:-6817} pidfile=$CTLD_PID
        else
            var=LOCAL_SLURM_SLURMD_PORT port=${LOCAL_SLURM_SLURMD_PORT:-6818} pidfile=$(slurmd_pidfile localhost)
        fi
        live_pid "$pidfile" "$name" >/dev/null && continue
        if [[ -n $(ss -Hltn "sport = :$port" 2>/dev/null) ]]; then
            die "port $port (for $name) is already in use by: $(ss -Hltnp "sport = :$port" 2>/dev/null | grep -o 'users:.*' || echo '?'); stop that first or set $var"
        fi
    done
}

remove_etc_link() {
    if [[ -L $ETC_CONF && $(readlink "$ETC_CONF") == "$CONF" ]]; then
        rm -f "$ETC_CONF"
    fi
}

# ------------------------------------------------------------------ munge ----
start_munged() {
    if live_pid "$MUNGED_PID" munged >/dev/null; then
        log "munged already running"
        return 0
    fi
    mkdir -p "$MUNGE_DIR" "$MUNGE_SOCK_DIR"
    rm -f "$MUNGE_SOCK" "$MUNGE_SOCK.lock"

    # munged refuses a socket whose path is not searchable by everyone and
    # a key readable by anyone else; the munge user must be able to reach
    # STATE_DIR for that. pytest's tmp dirs (/tmp/pytest-of-root, 0700) are
    # not reachable, so there we run munged as root with --force, which only
    # downgrades the "socket not accessible to all" check to a warning
    # (harmless: every client here is root).
    local as_munge=0 owner=root
    if id munge >/dev/null 2>&1 && runuser -u munge -- test -x "$MUNGE_SOCK_DIR/." 2>/dev/null; then
        as_munge=1
        owner=munge
    fi
    chown "$owner:$owner" "$MUNGE_DIR" "$MUNGE_SOCK_DIR"
    chmod 0700 "$MUNGE_DIR"
    chmod 0755 "$MUNGE_SOCK_DIR"
    if [[ ! -s $MUNGE_KEY ]]; then
        mungekey --create --keyfile="$MUNGE_KEY" >&2
    fi
    chown "$owner:$owner" "$MUNGE_KEY"
    chmod 0600 "$MUNGE_KEY"

    local args=(--socket="$MUNGE_SOCK" --key-file="$MUNGE_KEY"
        --pid-file="$MUNGED_PID" --log-file="$MUNGE_DIR/munged.log"
        --seed-file="$MUNGE_DIR/munged.seed")
    STARTED+=("munged:$MUNGED_PID")
    if ((as_munge)); then
        env LOCAL_SLURM_STATE_DIR="$STATE_DIR" runuser -u munge -- munged "${args[@]}" >&2 ||
            die_log "$MUNGE_DIR/munged.log" "munged failed to start"
    else
        log "munge user cannot reach $STATE_DIR; running munged as root (--force)"
        env LOCAL_SLURM_STATE_DIR="$STATE_DIR" munged --force "${args[@]}" >&2 ||
            die_log "$MUNGE_DIR/munged.log" "munged failed to start"
    fi
    # munged forks; the socket appearing is the readiness signal.
    local deadline=$((SECONDS + 10))
    until [[ -S $MUNGE_SOCK ]] && munge -S "$MUNGE_SOCK" -n </dev/null | unmunge -S "$MUNGE_SOCK" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die_log "$MUNGE_DIR/munged.log" "munged did not come up"
        sleep 0.2
    done
    log "munged up (pid $(cat "$MUNGED_PID"))"
}

# ---------------------------------------------------------------- daemons ----
start_daemon() { # start_daemon NAME PIDFILE LOGFILE CMD...
    local name=$1 pidfile=$2 logfile=$3
    shift 3
    if live_pid "$pidfile" "$name" >/dev/null; then
        log "$name already running"
        return 0
    fi
    rm -f "$pidfile"
    # The daemons fork and write their own pid files. The marker variable
    # is inherited by slurmstepd's, which is how `stop` finds stragglers.
    STARTED+=("$name:$pidfile")
    env SLURM_CONF="$CONF" LOCAL_SLURM_STATE_DIR="$STATE_DIR" "$@" >&2 ||
        die_log "$logfile" "$name failed to start; see $logfile"
    local deadline=$((SECONDS + 15))
    until live_pid "$pidfile" "$name" >/dev/null; do
        ((SECONDS < deadline)) || die_log "$logfile" "$name did not come up (no live pid in $pidfile)"
        sleep 0.2
    done
    log "$name up (pid $(cat "$pidfile"))"
}

start_slurmds() {
    local i
    for ((i = 0; i < ${#NODES[@]}; i++)); do
        local node=${NODES[$i]} IN_NODE=()
        namespaced && in_node "$i"
        start_daemon slurmd "$(slurmd_pidfile "$node")" "$LOG_DIR/slurmd-$node.log" \
            "${IN_NODE[@]}" slurmd -f "$CONF" -N "$node"
    done
}

node_state() { # node_state NODE
    local out
    out=$(SLURM_CONF=$CONF sinfo -h -N -n "$1" -o '%T' 2>/dev/null) || return 1
    printf '%s\n' "${out%%$'\n'*}"
}

wait_idle() {
    local node
    for node in "${NODES[@]}"; do
        wait_node_idle "$node"
    done
}

wait_node_idle() { # wait_node_idle NODE
    local NODE=$1 timeout=${LOCAL_SLURM_TIMEOUT:-60} deadline state last_resume=-100
    deadline=$((SECONDS + timeout))
    while :; do
        state=$(node_state "$NODE" || true)
        case $state in
        idle | mixed | allocated | completing)
            log "node $NODE is $state"
            return 0
            ;;
        drained | draining | down | inval | fail*)
            # A gres/memory mismatch from an earlier config, or a node that
            # was marked down while slurmd was gone, stays that way until
            # told otherwise; retry every few seconds in case the first
            # resume raced with slurmd's registration.
            if ((SECONDS - last_resume >= 5)); then
                log "node $NODE is $state; resuming"
                SLURM_CONF=$CONF scontrol update nodename="$NODE" state=resume >&2 || true
                last_resume=$SECONDS
            fi
            ;;
        esac
        if ((SECONDS >= deadline)); then
            local reason
            reason=$(SLURM_CONF=$CONF sinfo -h -N -n "$NODE" -o '%E' 2>/dev/null || true)
            die_log "$LOG_DIR/slurmd-$NODE.log" "timed out after ${timeout}s waiting for node $NODE to be idle (state='${state:-no answer}' reason='${reason}'); logs in $LOG_DIR"
        fi
        sleep 0.5
    done
}

cmd_start() {
    need_root start
    set_paths "$@"
    mkdir -p "$STATE_DIR"
    local bin
    for bin in slurmctld slurmd munged mungekey sinfo scontrol; do
        command -v "$bin" >/dev/null || die "$bin not found; run: $0 install"
    done

    check_other_instance
    check_ports

    local up=0 node
    live_pid "$CTLD_PID" slurmctld >/dev/null && up=1
    for node in "${NODES[@]}"; do
        live_pid "$(slurmd_pidfile "$node")" slurmd >/dev/null && up=1
    done
    if ((up == 0)) || [[ ! -s $CONF ]]; then
        # Only rewrite the config while nothing reads it; rewriting under a
        # running slurmctld would leave it and slurmd disagreeing.
        write_config
    fi

    # A failed start tears down what this call started, so a caller (or a
    # test fixture) that sees the error has nothing to clean up; daemons that
    # were already running before this call are left alone.
    STARTED=()
    trap 'start_failed' EXIT
    if namespaced; then
        ((up == 1)) || net_up
    else
        write_etc_link
    fi
    start_munged
    start_daemon slurmctld "$CTLD_PID" "$LOG_DIR/slurmctld.log" slurmctld -f "$CONF"
    start_slurmds
    wait_idle
    trap - EXIT

    printf 'export SLURM_CONF=%q\n' "$CONF"
    printf 'export LOCAL_SLURM_STATE_DIR=%q\n' "$STATE_DIR"
    if namespaced; then
        printf 'export LOCAL_SLURM_IFNAME=%q\n' "$NODE_IFNAME"
    fi
}

start_failed() {
    local rc=$?
    ((rc == 0)) && return 0
    local i
    for ((i = ${#STARTED[@]} - 1; i >= 0; i--)); do
        stop_one "${STARTED[$i]%%:*}" "${STARTED[$i]#*:}" || true
    done
    if ! live_pid "$CTLD_PID" slurmctld >/dev/null; then
        remove_etc_link
        namespaced && net_down
    fi
    log "start failed; stopped what it had started (${STARTED[*]:-nothing})"
    exit "$rc"
}

cmd_status() {
    set_paths "$@"
    local rc=0 name pidfile pid node daemons=("munged:$MUNGED_PID" "slurmctld:$CTLD_PID")
    for node in "${NODES[@]}"; do
        daemons+=("slurmd:$(slurmd_pidfile "$node")")
    done
    for name in "${daemons[@]}"; do
        pidfile=${name#*:} name=${name%%:*}
        if pid=$(live_pid "$pidfile" "$name"); then
            log "$name running (pid $pid)"
        else
            log "$name not running ($pidfile)"
            rc=1
        fi
    done
    if ((rc == 0)); then
        for node in "${NODES[@]}"; do
            log "node $node: $(node_state "$node" || echo '?')"
        done
    fi
    return $rc
}

stop_one() { # stop_one NAME PIDFILE
    local name=$1 pidfile=$2 pid
    pid=$(live_pid "$pidfile" "$name") || { rm -f "$pidfile"; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_gone 20 "$pid"; then
        log "$name (pid $pid) ignored SIGTERM; killing"
        kill -KILL "$pid" 2>/dev/null || true
        wait_gone 5 "$pid" || die "$name (pid $pid) would not die"
    fi
    rm -f "$pidfile"
    log "$name stopped"
}

cmd_stop() {
    need_root stop
    set_paths "$@"
    # No early return for a missing STATE_DIR: daemons whose dir was deleted
    # under them are still found by the marker sweep below.

    # Cancel jobs first so slurmd's stepds kill the job processes cleanly;
    # killing slurmd alone leaves slurmstepd and the job's children behind.
    if live_pid "$CTLD_PID" slurmctld >/dev/null; then
        SLURM_CONF=$CONF scancel --full --quiet --partition="$PARTITION" >/dev/null 2>&1 ||
            SLURM_CONF=$CONF scancel --quiet --partition="$PARTITION" >/dev/null 2>&1 || true
        local deadline=$((SECONDS + 20))
        while [[ -n $(SLURM_CONF=$CONF squeue -h -t PD,R,CG,S -o %i 2>/dev/null) ]] &&
            ((SECONDS < deadline)); do
            sleep 0.5
        done
    fi

    local node
    for node in "${NODES[@]}"; do
        stop_one slurmd "$(slurmd_pidfile "$node")"
    done
    stop_one slurmctld "$CTLD_PID"
    stop_one munged "$MUNGED_PID"

    # Last resort for anything spawned on our behalf that survived.
    local left
    left=$(marked_pids | tr '\n' ' ')
    if [[ -n ${left// /} ]]; then
        log "killing leftover processes: $left"
        # shellcheck disable=SC2086
        kill -KILL $left 2>/dev/null || true
        # shellcheck disable=SC2086
        wait_gone 5 $left || true
    fi
    remove_etc_link
    namespaced && net_down
    rm -f "$MUNGE_SOCK" "$MUNGE_SOCK.lock"

    left=$(marked_pids | tr '\n' ' ')
    [[ -z ${left// /} ]] || die "processes still running after stop: $left"
    log "stopped"
}

main() {
    local cmd=${1:-}
    [[ -n $cmd ]] || usage
    shift
    case $cmd in
    install) cmd_install "$@" ;;
    start) cmd_start "$@" ;;
    stop) cmd_stop "$@" ;;
    status) cmd_status "$@" ;;
    -h | --help | help) usage ;;
    *) die "unknown command '$cmd' (install|start|stop|status)" ;;
    esac
}

main "$@"
