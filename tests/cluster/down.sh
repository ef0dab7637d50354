#!/usr/bin/env bash
# Stop the local test cluster started by up.sh and remove its state. Stops only
# the processes whose pid files up.sh wrote (plus the pod containers the
# cluster's own containerd started). Idempotent.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

cluster_lock
if [[ ! -d $STATE ]]; then
  log "no cluster state at $STATE; nothing to do"
  exit 0
fi

# kube-router's iptables chains and ipsets (its --cleanup-config in v2.1.0 skips
# the filter table when no controller is running).
remove_netpol_rules() {
  local rule chain chains
  iptables-save -t filter | grep -E '^-A (INPUT|FORWARD|OUTPUT) .*-j KUBE-(ROUTER|NWPLCY|POD-FW)' \
    | sed 's/^-A /-D /' | while read -r rule; do
      eval "iptables -t filter $rule" || log "could not remove iptables rule: $rule"
    done
  chains=$(iptables-save -t filter | sed -n 's/^:\(KUBE-\(ROUTER\|NWPLCY\|POD-FW\)[^ ]*\) .*/\1/p')
  for chain in $chains; do iptables -t filter -F "$chain"; done
  for chain in $chains; do iptables -t filter -X "$chain" || log "could not delete chain $chain"; done
  if command -v ipset >/dev/null; then
    for set in $(ipset list -n | grep -E '^KUBE-(DST|SRC|ROUTER|NWPLCY)' || true); do
      ipset destroy "$set" 2>/dev/null || log "could not destroy ipset $set"
    done
  fi
}

# The pinned ctr (containerd 2.x); it also talks to a containerd 1.x left by older scripts.
CTR=$CONTAINERD_BIN/ctr
[[ -x $CTR ]] || CTR=ctr
ctr_k8s() { "$CTR" --address "$CONTAINERD_SOCK" --namespace k8s.io "$@"; }

# Let kubelet tear pods down properly (CNI DEL, unmounts) while it still can.
if running kube-apiserver && running kubelet && running containerd; then
  kc delete pods --all-namespaces --field-selector "spec.nodeName=$NODE_NAME" \
    --grace-period=0 --force --wait=false >/dev/null 2>&1 || true
  for ((i = 0; i < 60; i++)); do
    [[ -z $(ctr_k8s tasks ls -q 2>/dev/null) ]] && break
    sleep 1
  done
fi

for name in "${OPTIONAL_COMPONENTS[@]}"; do stop_component "$name"; done
for ((c = ${#COMPONENTS[@]} - 1; c >= 0; c--)); do
  name=${COMPONENTS[c]}
  if [[ $name == containerd ]] && running containerd; then
    # Whatever kubelet did not get to: kill the tasks so their shims exit.
    for t in $(ctr_k8s tasks ls -q 2>/dev/null); do
      ctr_k8s tasks kill -s SIGKILL "$t" >/dev/null 2>&1 || true
    done
    sleep 1
    for t in $(ctr_k8s tasks ls -q 2>/dev/null); do
      ctr_k8s tasks rm -f "$t" >/dev/null 2>&1 || true
    done
    for t in $(ctr_k8s containers ls -q 2>/dev/null); do
      ctr_k8s containers rm "$t" >/dev/null 2>&1 || true
    done
  fi
  stop_component "$name"
  if [[ $name == kube-router ]]; then remove_netpol_rules; fi
done

# Shims outlive containerd by design; ours carry our containerd's socket address.
for pid in $(pgrep -f "containerd-shim.* -address $CONTAINERD_SOCK" || true); do
  log "killing leftover shim pid $pid"
  kill -KILL "$pid" 2>/dev/null || true
done

# ...and so do gVisor sandboxes whose shim is gone; ours use our runsc root.
for pid in $(pgrep -f "runsc.* --root=$STATE/runsc" || true); do
  log "killing leftover gVisor process pid $pid"
  kill -KILL "$pid" 2>/dev/null || true
done

# Pod volumes, sandbox /dev/shm and snapshot mounts live under the state dir.
findmnt -rn -o TARGET | grep -F "$STATE/" | sort -r | while read -r m; do
  umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || log "could not unmount $m"
done
ip link show evalrun-cni0 >/dev/null 2>&1 && ip link del evalrun-cni0

rm -rf --one-file-system "$STATE"
log "cluster stopped; removed $STATE"
