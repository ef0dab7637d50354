#!/usr/bin/env bash
# Stop the local test cluster started by up.sh and remove its state. Stops only
# the processes whose pid files up.sh wrote (plus the pod containers the
# cluster's own containerd started). Idempotent.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if [[ ! -d $STATE ]]; then
  log "no cluster state at $STATE; nothing to do"
  exit 0
fi

ctr_k8s() { ctr --address "$CONTAINERD_SOCK" --namespace k8s.io "$@"; }

# Let kubelet tear pods down properly (CNI DEL, unmounts) while it still can.
if running kube-apiserver && running kubelet && running containerd; then
  kc delete pods --all-namespaces --field-selector "spec.nodeName=$NODE_NAME" \
    --grace-period=0 --force --wait=false >/dev/null 2>&1 || true
  for ((i = 0; i < 60; i++)); do
    [[ -z $(ctr_k8s tasks ls -q 2>/dev/null) ]] && break
    sleep 1
  done
fi

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
  if [[ $name == kube-router && -f $RUN/kube-router.cmd && -x $KUBE_ROUTER_BIN/kube-router ]]; then
    # Remove the iptables chains and ipsets it programmed for NetworkPolicies.
    "$KUBE_ROUTER_BIN/kube-router" --cleanup-config --run-router=false --run-service-proxy=false \
      >>"$LOGS/kube-router.log" 2>&1 || log "kube-router --cleanup-config failed (see its log)"
  fi
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
