# Shared settings for tests/cluster/*.sh (sourced, not executed).
# shellcheck shell=bash

CLUSTER_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.env
. "$CLUSTER_DIR/versions.env"

# Builds live outside the checkout, keyed by version, so fresh clones and CI reuse them.
CACHE=${EVALRUN_CLUSTER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/evalrun/cluster}
# Runtime state: certs, etcd data, logs, pid files, kubeconfig.
STATE=${EVALRUN_CLUSTER_STATE:-/var/tmp/evalrun-cluster}
REGISTRY=${EVALRUN_REGISTRY:-127.0.0.1:5000}

GO=${EVALRUN_GO:-/usr/local/go/bin/go}
export GOTOOLCHAIN=local CGO_ENABLED=0
# Only two cores here: keep builds from starving everything else.
GO_BUILD_P=${EVALRUN_GO_BUILD_P:-2}

K8S_BIN=$CACHE/kubernetes-$KUBERNETES_VERSION/bin
ETCD_BIN=$CACHE/etcd-$ETCD_VERSION/bin
KWOK_BIN=$CACHE/kwok-$KWOK_VERSION/bin
HELM_BIN=$CACHE/helm-$HELM_VERSION/bin
COSIGN_BIN=$CACHE/cosign-$COSIGN_VERSION/bin
KUBE_ROUTER_BIN=$CACHE/kube-router-$KUBE_ROUTER_VERSION/bin
CONTAINERD_DIR=$CACHE/containerd-$CONTAINERD_VERSION
CONTAINERD_BIN=$CONTAINERD_DIR/bin
SEAWEEDFS_DIR=$CACHE/seaweedfs-$SEAWEEDFS_VERSION
SEAWEEDFS_BIN=$SEAWEEDFS_DIR/bin
KUEUE_DIR=$CACHE/kueue-$KUEUE_VERSION
KUEUE_BIN=$KUEUE_DIR/bin
GVISOR_BIN=$CACHE/gvisor-shim-$GVISOR_SHIM_VERSION-$(cat "$CLUSTER_DIR"/patches/gvisor-*.patch | sha256sum | cut -c1-12)/bin
IMAGES_DIR=$CACHE/images-$(cd "$CLUSTER_DIR/images" && cat go.mod */*.go | sha256sum | cut -c1-16)
PAUSE_IMAGE=$REGISTRY/evalrun/pause:$PAUSE_VERSION
KUBECTL=$K8S_BIN/kubectl
KUBECONFIG_PATH=$STATE/kubeconfig

log() { printf '[cluster %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

NODE_NAME=${EVALRUN_NODE_NAME:-evalrun-node}
KWOK_NODE_COUNT=${EVALRUN_KWOK_NODES:-50}
APISERVER_PORT=${EVALRUN_APISERVER_PORT:-6443}
ETCD_CLIENT_PORT=${EVALRUN_ETCD_PORT:-12379}
ETCD_PEER_PORT=$((ETCD_CLIENT_PORT + 1))
POD_SUBNET=${EVALRUN_POD_SUBNET:-10.244.0.0/24}
SERVICE_CIDR=10.96.0.0/16
PKI=$STATE/pki
RUN=$STATE/run
LOGS=$STATE/logs
CONTAINERD_SOCK=$STATE/containerd/containerd.sock
# Start order; down.sh stops in reverse.
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler containerd kubelet kube-router kwok)
# Started on demand by kueue-up.sh (the queueing tests), stopped by down.sh.
OPTIONAL_COMPONENTS=(kueue)

# Serialise up.sh, down.sh and component.sh start/stop: pytest sessions may call
# up.sh at the same time, and two racing starts would leave untracked processes.
# The lock fd is closed in every component we launch (see launch_component), or
# the daemons would hold the lock for as long as they live.
cluster_lock() {
  mkdir -p "$(dirname "$STATE")"
  exec {CLUSTER_LOCK_FD}>"${STATE%/}.oplock"
  flock "$CLUSTER_LOCK_FD"
}

kc() { "$KUBECTL" --kubeconfig "$KUBECONFIG_PATH" "$@"; }

# running NAME: the pid in NAME's pid file is alive and still runs the binary we started.
running() {
  local pid exe
  pid=$(cat "$RUN/$1.pid" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
  exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
  [[ $exe == "$(cat "$RUN/$1.exe" 2>/dev/null)" ]]
}

log_tail() {
  local name=$1
  log "---- last 60 lines of $LOGS/$name.log ----"
  tail -n 60 "$LOGS/$name.log" >&2 2>/dev/null || log "(no log)"
  log "---- end of $name log ----"
}

fail_component() { log "ERROR: $1: $2"; log_tail "$1"; exit 1; }

# start_component NAME BINARY ARGS...: start it detached, with its own log and pid file,
# unless our earlier instance is still running. The command line is kept in
# run/NAME.cmd so that `component.sh restart NAME` can start it again.
start_component() {
  local name=$1; shift
  if running "$name"; then
    # A version bump changes the binary's path; an old process must not pass for the new one.
    [[ $(cat "$RUN/$name.exe") == "$(realpath "$1")" ]] \
      || die "$name runs $(cat "$RUN/$name.exe"), but this checkout pins $(realpath "$1"): run tests/cluster/down.sh (make cluster-down) first"
    log "$name already running (pid $(cat "$RUN/$name.pid"))"
    return 0
  fi
  mkdir -p "$RUN" "$LOGS"
  {
    # COMPONENT_PATH (set for one call) goes in front of PATH, e.g. to find a shim.
    [[ -n ${COMPONENT_PATH:-} ]] && printf 'export PATH=%q\n' "$COMPONENT_PATH:$PATH"
    printf 'exec'; printf ' %q' "$@"; echo
  } >"$RUN/$name.cmd"
  realpath "$1" >"$RUN/$name.exe"
  launch_component "$name"
}

launch_component() {
  local name=$1
  echo "==== $(date -u +%FT%TZ) starting $name" >>"$LOGS/$name.log"
  if [[ -n ${CLUSTER_LOCK_FD:-} ]]; then
    setsid bash "$RUN/$name.cmd" >>"$LOGS/$name.log" 2>&1 </dev/null {CLUSTER_LOCK_FD}>&- &
  else
    setsid bash "$RUN/$name.cmd" >>"$LOGS/$name.log" 2>&1 </dev/null &
  fi
  echo $! >"$RUN/$name.pid"
  log "started $name (pid $!, log $LOGS/$name.log)"
}

# stop_component NAME: TERM (then KILL after 30s) the process we started; no-op otherwise.
stop_component() {
  local name=$1 pid i
  if ! running "$name"; then
    rm -f "$RUN/$name.pid"
    return 0
  fi
  pid=$(cat "$RUN/$name.pid")
  kill -TERM "$pid"
  for ((i = 0; i < 60; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "$name (pid $pid) ignored SIGTERM; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$RUN/$name.pid"
  log "stopped $name (pid $pid)"
}

# wait_for NAME TIMEOUT WHAT CMD...: poll CMD until it succeeds; fail with NAME's
# log tail if NAME dies or TIMEOUT seconds pass.
wait_for() {
  local name=$1 timeout=$2 what=$3; shift 3
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    running "$name" || fail_component "$name" "exited while waiting for $what"
    ((SECONDS < deadline)) || fail_component "$name" "timed out after ${timeout}s waiting for $what"
    sleep 1
  done
}
