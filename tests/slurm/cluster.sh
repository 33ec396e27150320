#!/usr/bin/env bash
# cluster.sh - a throw-away local SLURM cluster for tests and for trying cluster=slurm by hand (as root).
#
#   tests/slurm/cluster.sh single       # 1 node named $(hostname -s) on 127.0.0.1; slurmctld :6817
#   tests/slurm/cluster.sh netns [N]    # N nodes n1..nN (default 2), each slurmd in its own network + UTS
#                                       #   namespace behind bridge lslbr0 (10.250.0.1/24, nodes 10.250.0.1X);
#                                       #   slurmctld :6827. Needs CAP_NET_ADMIN + CAP_SYS_ADMIN.
#   tests/slurm/cluster.sh status [single|netns]   # exit 0 when every daemon of that cluster is alive
#   tests/slurm/cluster.sh down [single|netns]     # stop the daemons this script started (by PID file);
#                                       #   no argument: both clusters, munged, namespaces, bridge
#   tests/slurm/cluster.sh purge        # down + delete the scratch dir
# then: export SLURM_CONF=$SLURM_LOCAL_ROOT/<single|netns>/etc/slurm.conf (printed on success); sinfo; sbatch ...
#
# Everything (munge key and socket, configs, state, spool, logs, PID files) lives under
# SLURM_LOCAL_ROOT (default ${TMPDIR:-/tmp}/launcher-slurm); /etc is never written. Idempotent: `single` or
# `netns` again leaves live daemons alone and starts only what is missing. Installs slurm-wlm and munge
# with apt-get when they are missing. Daemons double-fork, so each is known by its PID file, and only
# PIDs read from those files are ever signalled.
set -euo pipefail
ROOT=${SLURM_LOCAL_ROOT:-${TMPDIR:-/tmp}/launcher-slurm}
MSOCK=$ROOT/munge/munge.socket.2
HOST=$(hostname -s)
NCPU=$(nproc)
MEM_MB=$(($(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024))
BRIDGE=lslbr0      # names of our own, so nothing else on the machine is touched
NS_PREFIX=lslnode
VETH_PREFIX=lslveth
SUBNET=10.250.0
# Step credential lifetime; a requeued job also waits this long before it may start again (Slurm's
# default 120 s makes a requeue test take minutes). Low values leave little slack for slow step starts.
CRED_EXPIRE=${SLURM_LOCAL_CRED_EXPIRE:-10}

log() { echo "[cluster.sh $(date +%T.%3N)] $*" >&2; }
die() { log "error: $*"; exit 1; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

ensure_installed() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null &&
    command -v mungekey >/dev/null && command -v sbatch >/dev/null && return 0
  [ "$(id -u)" = 0 ] || die "slurm-wlm and munge are missing; install them (apt-get install -y slurm-wlm munge)"
  log "installing slurm-wlm and munge (apt-get)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

start_munge() {
  mkdir -p "$ROOT/munge"
  chmod 755 "$ROOT" "$ROOT/munge" # munged refuses a socket dir that is not o+x
  [ -s "$ROOT/munge/munge.key" ] || mungekey -c -k "$ROOT/munge/munge.key"
  chmod 600 "$ROOT/munge/munge.key"
  alive "$ROOT/munge/munged.pid" && return 0
  rm -f "$MSOCK"
  munged --key-file="$ROOT/munge/munge.key" --socket="$MSOCK" --pid-file="$ROOT/munge/munged.pid" \
    --log-file="$ROOT/munge/munged.log" --seed-file="$ROOT/munge/munged.seed"
  munge -S "$MSOCK" -n | unmunge -S "$MSOCK" >/dev/null
  log "munged pid $(cat "$ROOT/munge/munged.pid")"
}

# write_conf <dir> <cluster name> <ctld addr> <ctld port> <node lines...>
write_conf() {
  local d=$1 name=$2 addr=$3 port=$4
  shift 4
  mkdir -p "$d"/{etc,log,run,state,spool}
  : >"$d/etc/plugstack.conf" # keeps slurmd away from /etc/slurm/plugstack.conf
  {
    cat <<EOF
ClusterName=$name
SlurmctldHost=$HOST($addr)
SlurmctldPort=$port
SlurmdPort=6818
AuthType=auth/munge
AuthInfo=socket=$MSOCK,cred_expire=$CRED_EXPIRE
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$d/state
SlurmdSpoolDir=$d/spool/slurmd.%n
SlurmctldPidFile=$d/run/slurmctld.pid
SlurmdPidFile=$d/run/slurmd.%n.pid
SlurmctldLogFile=$d/log/slurmctld.log
SlurmdLogFile=$d/log/slurmd.%n.log
PlugStackConfig=$d/etc/plugstack.conf
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
ReturnToService=2
MinJobAge=16
KillWait=10
SlurmctldDebug=info
SlurmdDebug=info
EOF
    printf '%s\n' "$@"
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
  } >"$d/etc/slurm.conf.new"
  mv "$d/etc/slurm.conf.new" "$d/etc/slurm.conf"
}

start_ctld() { # <dir>
  local d=$1
  alive "$d/run/slurmctld.pid" && return 0
  slurmctld -c -f "$d/etc/slurm.conf"
  for _ in $(seq 50); do
    alive "$d/run/slurmctld.pid" && SLURM_CONF=$d/etc/slurm.conf scontrol ping >/dev/null 2>&1 && break
    sleep 0.2
  done
  alive "$d/run/slurmctld.pid" || die "slurmctld did not start; see $d/log/slurmctld.log"
  log "slurmctld pid $(cat "$d/run/slurmctld.pid") ($d)"
}

wait_idle() { # <dir> <nodes>
  local d=$1 n=$2
  for _ in $(seq 150); do
    if [ "$(SLURM_CONF=$d/etc/slurm.conf sinfo -h -N -t idle,mix,alloc -o %N | sort -u | wc -l)" = "$n" ]; then
      SLURM_CONF=$d/etc/slurm.conf sinfo >&2
      return 0
    fi
    sleep 0.2
  done
  SLURM_CONF=$d/etc/slurm.conf sinfo -N -l >&2
  die "nodes did not come up; see $d/log"
}

up_single() {
  local d=$ROOT/single
  start_munge
  write_conf "$d" single 127.0.0.1 6817 \
    "NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$NCPU RealMemory=$((MEM_MB * 85 / 100)) State=UNKNOWN"
  mkdir -p "$d/spool/slurmd.$HOST"
  start_ctld "$d"
  alive "$d/run/slurmd.$HOST.pid" || slurmd -f "$d/etc/slurm.conf" -N "$HOST"
  wait_idle "$d" 1
  echo "export SLURM_CONF=$d/etc/slurm.conf"
}

have_netns_privileges() {
  # A throw-away namespace and link: succeeds only with CAP_NET_ADMIN + CAP_SYS_ADMIN.
  unshare --net --mount true 2>/dev/null && ip link add lslprobe0 type bridge 2>/dev/null &&
    ip link del lslprobe0 2>/dev/null
}

up_netns() {
  local n=$1 d=$ROOT/netns i lines=()
  [[ $n =~ ^[1-9][0-9]?$ ]] || die "netns: node count must be 1..99, got '$n'"
  if [ -s "$d/nodes" ] && [ "$(cat "$d/nodes")" != "$n" ] && alive "$d/run/slurmctld.pid"; then
    die "the netns cluster runs with $(cat "$d/nodes") nodes; run '$0 down netns' first to change it"
  fi
  command -v ip >/dev/null && command -v nsenter >/dev/null || die "netns needs iproute2 and util-linux"
  if ! ip link show "$BRIDGE" >/dev/null 2>&1 && ! have_netns_privileges; then
    log "error: netns needs root with CAP_NET_ADMIN and CAP_SYS_ADMIN (network namespaces, veth, bridge)"
    exit 3 # the tests skip only the two-node case on this code
  fi
  start_munge
  mkdir -p "$d"
  [ -d /run/netns ] || touch "$d/created-run-netns" # remove /run/netns again at down
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
    ip addr add "$SUBNET.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
  fi
  for i in $(seq "$n"); do
    if ! ip netns list | grep -qw "$NS_PREFIX$i"; then
      ip netns add "$NS_PREFIX$i"
      ip link add "$VETH_PREFIX$i" type veth peer name eth0 netns "$NS_PREFIX$i"
      ip link set "$VETH_PREFIX$i" master "$BRIDGE" up
      ip -n "$NS_PREFIX$i" addr add "$SUBNET.$((10 + i))/24" dev eth0
      ip -n "$NS_PREFIX$i" link set eth0 up
      ip -n "$NS_PREFIX$i" link set lo up
    fi
    lines+=("NodeName=n$i NodeAddr=$SUBNET.$((10 + i)) CPUs=$NCPU RealMemory=$((MEM_MB * 85 / 100 / n)) State=UNKNOWN")
  done
  echo "$n" >"$d/nodes"
  write_conf "$d" netns "$SUBNET.1" 6827 "${lines[@]}"
  {
    echo "127.0.0.1 localhost"
    echo "$SUBNET.1 $HOST"
    for i in $(seq "$n"); do echo "$SUBNET.$((10 + i)) n$i"; done
  } >"$d/etc/hosts"
  start_ctld "$d"
  for i in $(seq "$n"); do
    mkdir -p "$d/spool/slurmd.n$i"
    alive "$d/run/slurmd.n$i.pid" && continue
    # nsenter, not `ip netns exec`: the latter remounts /sys, hiding /sys/fs/cgroup, and slurmd 22.05 then
    # dies initialising its cgroup plugin. Own UTS ns: hostname n$i. Own mount ns: a private /etc/hosts
    # that resolves n1..nN for the job steps (the machine's /etc/hosts is untouched).
    nsenter --net="/run/netns/$NS_PREFIX$i" unshare --uts --mount bash -c \
      "hostname n$i && mount --bind '$d/etc/hosts' /etc/hosts && exec slurmd -f '$d/etc/slurm.conf' -N n$i"
  done
  wait_idle "$d" "$n"
  echo "export SLURM_CONF=$d/etc/slurm.conf"
}

status() { # <single|netns>: all daemons of that cluster alive
  local d=$ROOT/$1 f any=0
  alive "$ROOT/munge/munged.pid" && alive "$d/run/slurmctld.pid" || return 1
  shopt -s nullglob
  for f in "$d"/run/slurmd.*.pid; do alive "$f" || return 1; any=1; done
  [ $any = 1 ]
}

stop_pidfiles() { # SIGTERM the given daemons together, wait up to 15 s, SIGKILL what is left; by PID only
  local f pid pids=() left
  for f in "$@"; do
    [ -s "$f" ] || continue
    pid=$(cat "$f")
    rm -f "$f"
    kill -0 "$pid" 2>/dev/null || continue
    kill "$pid" && pids+=("$pid") && log "SIGTERM $pid (${f##*/})"
  done
  [ ${#pids[@]} = 0 ] && return 0
  for _ in $(seq 75); do
    left=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && left=1; done
    [ $left = 0 ] && return 0
    sleep 0.2
  done
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && log "SIGKILL $pid" && kill -9 "$pid"; done
  return 0
}

delete_netns() {
  local ns
  for ns in $(ip netns list 2>/dev/null | awk -v p="^$NS_PREFIX[0-9]+$" '$1 ~ p {print $1}'); do
    ip link del "$VETH_PREFIX${ns#"$NS_PREFIX"}" 2>/dev/null || true # else it lingers until async ns cleanup
    ip netns del "$ns" && log "netns $ns deleted"
  done
  if ip link show "$BRIDGE" >/dev/null 2>&1; then ip link del "$BRIDGE" && log "bridge $BRIDGE deleted"; fi
  if [ -e "$ROOT/netns/created-run-netns" ] && [ -d /run/netns ] && [ -z "$(ls -A /run/netns)" ]; then
    umount /run/netns 2>/dev/null || true
    rmdir /run/netns 2>/dev/null || true
  fi
  rm -f "$ROOT/netns/created-run-netns"
}

down() { # [single|netns]
  shopt -s nullglob
  local which=${1:-all} v
  for v in single netns; do
    [ "$which" = all ] || [ "$which" = "$v" ] || continue
    stop_pidfiles "$ROOT/$v"/run/slurmd.*.pid
    stop_pidfiles "$ROOT/$v/run/slurmctld.pid"
    [ "$v" = netns ] && delete_netns
  done
  # munged goes with the last cluster
  if ! alive "$ROOT/single/run/slurmctld.pid" && ! alive "$ROOT/netns/run/slurmctld.pid"; then
    stop_pidfiles "$ROOT/munge/munged.pid"
  fi
  return 0
}

case ${1:-} in
  single) ensure_installed && up_single ;;
  netns) ensure_installed && up_netns "${2:-2}" ;;
  status) status "${2:-single}" ;;
  down) down "${2:-all}" ;;
  purge) down all && rm -rf "$ROOT" ;;
  *) echo "usage: $0 single | netns [N] | status [single|netns] | down [single|netns] | purge" >&2; exit 2 ;;
esac
