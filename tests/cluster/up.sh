#!/usr/bin/env bash
# Bring up the local test cluster: etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, containerd + kubelet (one real node, runc and gVisor) and kwok
# (fake GPU nodes). Idempotent: builds only what is missing from the cache and
# starts only what is not running. Prints the kubeconfig path on stdout; any
# failure exits non-zero with the failing component's log tail on stderr.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
REPO=$(cd "$CLUSTER_DIR/../.." && pwd)
started_at=$SECONDS

[[ $EUID -eq 0 ]] || die "must run as root (kubelet and containerd manage cgroups, mounts and network namespaces)"

ensure_packages() {
  local missing=()
  command -v runc >/dev/null || missing+=(runc)
  command -v runsc >/dev/null || missing+=(runsc)
  [[ -x /usr/lib/cni/bridge && -x /usr/lib/cni/host-local && -x /usr/lib/cni/loopback ]] \
    || missing+=(containernetworking-plugins)
  command -v openssl >/dev/null || missing+=(openssl)
  command -v iptables >/dev/null || missing+=(iptables)
  command -v ipset >/dev/null || missing+=(ipset)
  command -v ip >/dev/null || missing+=(iproute2)
  command -v curl >/dev/null || missing+=(curl)
  command -v python3 >/dev/null || missing+=(python3)
  command -v mount >/dev/null || missing+=(mount)
  ((${#missing[@]} == 0)) && return 0
  log "installing apt packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >&2 && apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 \
    || die "apt-get install ${missing[*]} failed"
}

node_ip() {
  local ip
  ip=$(ip -4 route get 1.1.1.1 2>/dev/null | sed -n 's/.* src \([0-9.]*\).*/\1/p' | head -n1)
  [[ -n $ip ]] || ip=$(ip -4 -o addr show scope global | awk '{print $4}' | cut -d/ -f1 | head -n1)
  [[ -n $ip ]] || die "no global IPv4 address for the node (kubelet refuses a loopback node IP)"
  echo "$ip"
}

ensure_registry() {
  if [[ -x $REPO/scripts/host-up.sh || -f $REPO/scripts/host-up.sh ]]; then
    bash "$REPO/scripts/host-up.sh" >&2 || die "scripts/host-up.sh failed (dockerd + registry)"
  fi
  curl -fsS -o /dev/null "http://$REGISTRY/v2/" \
    || die "OCI registry at $REGISTRY is not answering (scripts/host-up.sh starts it)"
}

push_images() {
  local pause probe
  pause=$(python3 "$CLUSTER_DIR/oci.py" push "$REGISTRY" evalrun/pause "$PAUSE_VERSION" \
    --file "/pause=$IMAGES_DIR/bin/pause" --entrypoint /pause) || die "pushing the pause image failed"
  probe=$(python3 "$CLUSTER_DIR/oci.py" push "$REGISTRY" evalrun/probe latest \
    --file "/probe=$IMAGES_DIR/bin/probe" --entrypoint /probe --cmd sleep 3600) \
    || die "pushing the probe image failed"
  printf 'PAUSE_IMAGE_REF=%s\nPROBE_IMAGE_REF=%s\n' "$pause" "$probe" >"$STATE/images.env"
}

write_configs() {
  local ip=$1
  mkdir -p "$STATE/containerd/certs.d/$REGISTRY" "$STATE/cni/net.d" "$STATE/kwok"
  # Options for containerd-shim-runsc-v1. runsc refuses to share the root network
  # namespace ("cannot run with network enabled in root network namespace") and no
  # network is what the sandbox wants anyway: --network=none.
  cat >"$STATE/containerd/runsc.toml" <<RUNSC
binary_name = "$(command -v runsc)"
root = "$STATE/runsc"

[runsc_config]
  network = "none"
RUNSC
  cat >"$STATE/containerd/certs.d/$REGISTRY/hosts.toml" <<HOSTS
server = "http://$REGISTRY"

[host."http://$REGISTRY"]
  capabilities = ["pull", "resolve"]
HOSTS
  # containerd 2.4's config format, version 4 (2.0-2.3 used 3, which 2.4 still
  # migrates with a warning): the CRI plugin is split into io.containerd.cri.v1.images
  # (pulls, registry, sandbox image) and io.containerd.cri.v1.runtime (runtimes,
  # CNI, OOM), and the gRPC/ttrpc listeners are server plugins. The ttrpc socket
  # must be set too: its default is the host's /run/containerd/containerd.sock.ttrpc.
  cat >"$STATE/containerd/config.toml" <<TOML
version = 4
root = "$STATE/containerd/root"
state = "$STATE/containerd/state"
# NRI would listen on the host-wide /var/run/nri/nri.sock; nothing here uses it.
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.nri.v1.nri"]

[plugins."io.containerd.server.v1.grpc"]
  address = "$CONTAINERD_SOCK"
[plugins."io.containerd.server.v1.ttrpc"]
  address = "$CONTAINERD_SOCK.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "$STATE/containerd/opt"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "$PAUSE_IMAGE"
  [plugins."io.containerd.cri.v1.images".registry]
    config_path = "$STATE/containerd/certs.d"

[plugins."io.containerd.cri.v1.runtime"]
  # root here lacks CAP_SYS_RESOURCE: no oom_score_adj below containerd's own (0),
  # which the pause container's default -998 would need.
  restrict_oom_score_adj = true
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "$(command -v runc)"
        SystemdCgroup = false
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.gvisor]
      runtime_type = "io.containerd.runsc.v1"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.gvisor.options]
        TypeUrl = "io.containerd.runsc.v1.options"
        ConfigPath = "$STATE/containerd/runsc.toml"
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = "$STATE/cni/net.d"
TOML
  cat >"$STATE/cni/net.d/10-evalrun.conflist" <<CNI
{
  "cniVersion": "0.4.0",
  "name": "evalrun",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "evalrun-cni0",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$POD_SUBNET"}]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": "$STATE/cni/ipam"
      }
    }
  ]
}
CNI
  cat >"$STATE/kubelet-config.yaml" <<KUBELET
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# These machines run cgroup v1, which kubelet >= 1.35 refuses unless told otherwise.
failCgroupV1: false
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix://$CONTAINERD_SOCK
address: $ip
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
tlsCertFile: $PKI/kubelet-serving.crt
tlsPrivateKeyFile: $PKI/kubelet-serving.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: Webhook}
failSwapOn: false
# No CAP_SYS_RESOURCE here, so kubelet cannot lower its own OOM score (default -999).
oomScoreAdj: 0
resolvConf: /etc/resolv.conf
serializeImagePulls: false
maxPods: 110
evictionHard:
  memory.available: 100Mi
  nodefs.available: 2%
  imagefs.available: 2%
imageGCHighThresholdPercent: 95
imageGCLowThresholdPercent: 90
KUBELET
}

start_control_plane() {
  start_component etcd "$ETCD_BIN/etcd" --name evalrun --data-dir "$STATE/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_CLIENT_PORT" \
    --advertise-client-urls "http://127.0.0.1:$ETCD_CLIENT_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "evalrun=http://127.0.0.1:$ETCD_PEER_PORT" \
    --listen-metrics-urls "" --quota-backend-bytes 2147483648 --log-level warn
  wait_for etcd 60 "etcd /health" curl -fsS "http://127.0.0.1:$ETCD_CLIENT_PORT/health"

  start_component kube-apiserver "$K8S_BIN/kube-apiserver" \
    --bind-address 127.0.0.1 --secure-port "$APISERVER_PORT" \
    --etcd-servers "http://127.0.0.1:$ETCD_CLIENT_PORT" \
    --client-ca-file "$PKI/ca.crt" \
    --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" \
    --kubelet-client-certificate "$PKI/apiserver-kubelet-client.crt" \
    --kubelet-client-key "$PKI/apiserver-kubelet-client.key" \
    --kubelet-preferred-address-types InternalIP,Hostname \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$PKI/sa.pub" \
    --service-account-signing-key-file "$PKI/sa.key" \
    --service-cluster-ip-range "$SERVICE_CIDR" \
    --authorization-mode Node,RBAC \
    --enable-admission-plugins NodeRestriction \
    --allow-privileged=true \
    --profiling=false \
    --event-ttl 1h
  wait_for kube-apiserver 180 "API server /readyz" kc get --raw /readyz

  # Client QPS as a large GPU cluster's operators set it: at the default (20/30 per
  # controller) the Job controller throttles itself to about 3 Jobs/s (pod create, status
  # updates, events), the bottleneck of benchmarks/bench_kwok.py (issue 15).
  start_component kube-controller-manager "$K8S_BIN/kube-controller-manager" \
    --kubeconfig "$PKI/kube-controller-manager.kubeconfig" \
    --authentication-kubeconfig "$PKI/kube-controller-manager.kubeconfig" \
    --authorization-kubeconfig "$PKI/kube-controller-manager.kubeconfig" \
    --bind-address 127.0.0.1 --leader-elect=false \
    --root-ca-file "$PKI/ca.crt" \
    --service-account-private-key-file "$PKI/sa.key" \
    --cluster-signing-cert-file "$PKI/ca.crt" --cluster-signing-key-file "$PKI/ca.key" \
    --use-service-account-credentials=true --profiling=false \
    --kube-api-qps 100 --kube-api-burst 200 --concurrent-job-syncs 20
  start_component kube-scheduler "$K8S_BIN/kube-scheduler" \
    --kubeconfig "$PKI/kube-scheduler.kubeconfig" \
    --authentication-kubeconfig "$PKI/kube-scheduler.kubeconfig" \
    --authorization-kubeconfig "$PKI/kube-scheduler.kubeconfig" \
    --bind-address 127.0.0.1 --leader-elect=false --profiling=false
  wait_for kube-controller-manager 60 "controller-manager /healthz" \
    curl -fsSk https://127.0.0.1:10257/healthz
  wait_for kube-scheduler 60 "scheduler /healthz" curl -fsSk https://127.0.0.1:10259/healthz
}

start_node() {
  local ip=$1
  # containerd finds containerd-shim-runc-v2 and containerd-shim-runsc-v1 on its PATH.
  COMPONENT_PATH=$CONTAINERD_BIN:$GVISOR_BIN start_component containerd "$CONTAINERD_BIN/containerd" \
    --config "$STATE/containerd/config.toml"
  wait_for containerd 60 "containerd socket" "$CONTAINERD_BIN/ctr" --address "$CONTAINERD_SOCK" version
  start_component kubelet "$K8S_BIN/kubelet" \
    --config "$STATE/kubelet-config.yaml" \
    --kubeconfig "$PKI/kubelet.kubeconfig" \
    --hostname-override "$NODE_NAME" --node-ip "$ip" \
    --root-dir "$STATE/kubelet" \
    --node-labels evalrun.dev/node=real
  wait_for kubelet 180 "node $NODE_NAME to register" kc get node "$NODE_NAME"
  wait_for kubelet 180 "node $NODE_NAME Ready" \
    kc wait --for=condition=Ready "node/$NODE_NAME" --timeout=5s
}

# kube-router as the NetworkPolicy engine only (no routing, no service proxy, no
# CNI): it turns policies into iptables/ipset rules for this node's pods, whose
# bridged traffic passes iptables because bridge-nf-call-iptables is on.
start_netpol() {
  [[ $(cat /proc/sys/net/bridge/bridge-nf-call-iptables 2>/dev/null) == 1 ]] \
    || echo 1 >/proc/sys/net/bridge/bridge-nf-call-iptables \
    || die "cannot enable net.bridge.bridge-nf-call-iptables (NetworkPolicy enforcement needs it)"
  start_component kube-router "$KUBE_ROUTER_BIN/kube-router" \
    --kubeconfig "$PKI/kube-router.kubeconfig" \
    --hostname-override "$NODE_NAME" \
    --run-firewall=true --run-router=false --run-service-proxy=false --enable-cni=false \
    --service-cluster-ip-range "$SERVICE_CIDR" \
    --health-port 20244 --metrics-port 0
  wait_for kube-router 60 "kube-router /healthz" curl -fsS http://127.0.0.1:20244/healthz
}

kwok_nodes_ready() {
  local ready
  ready=$(kc get nodes -l type=kwok \
    -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}') \
    || return 1
  (($(grep -c '^True$' <<<"$ready") >= KWOK_NODE_COUNT))
}

start_kwok() {
  local ip=$1
  bash "$CLUSTER_DIR/kwok-nodes.sh" "$KWOK_NODE_COUNT" >"$STATE/kwok/nodes.yaml"
  kc apply -f "$CLUSTER_DIR/manifests/runtimeclass-gvisor.yaml" >&2
  local gpus
  gpus=$(kc get nodes -l type=kwok -o jsonpath='{range .items[*]}{.status.allocatable.nvidia\.com/gpu}{"\n"}{end}')
  if (($(grep -c '^8$' <<<"$gpus") != KWOK_NODE_COUNT)); then
    kc apply -f "$STATE/kwok/nodes.yaml" >/dev/null || die "creating kwok nodes failed"
    # Capacity lives in node status, which create ignores; kwok's node-initialize
    # stage keeps an allocatable that is already there.
    local res='{"cpu":"96","memory":"1843Gi","pods":"110","ephemeral-storage":"7Ti","nvidia.com/gpu":"8"}'
    kc patch -f "$STATE/kwok/nodes.yaml" --subresource=status --type=merge \
      -p "{\"status\":{\"capacity\":$res,\"allocatable\":$res}}" >/dev/null \
      || die "setting kwok node GPU capacity failed"
  fi
  # MIG nodes (their own label type=kwok-mig, so the GPU node count stays as it was)
  bash "$CLUSTER_DIR/kwok-mig-nodes.sh" >"$STATE/kwok/mig-nodes.yaml"
  kc apply -f "$STATE/kwok/mig-nodes.yaml" >/dev/null || die "creating kwok MIG nodes failed"
  local mig_name mig_profile mig_count res
  while read -r mig_name mig_profile mig_count; do
    res="{\"cpu\":\"96\",\"memory\":\"1843Gi\",\"pods\":\"110\",\"ephemeral-storage\":\"7Ti\",\"nvidia.com/mig-$mig_profile\":\"$mig_count\"}"
    kc patch node "$mig_name" --subresource=status --type=merge \
      -p "{\"status\":{\"capacity\":$res,\"allocatable\":$res}}" >/dev/null \
      || die "setting kwok MIG node $mig_name capacity failed"
  done < <(bash "$CLUSTER_DIR/kwok-mig-nodes.sh" --capacity)
  local cfg=()
  for f in "$KWOK_BIN"/../stages/*.yaml; do cfg+=(--config "$(realpath "$f")"); done
  start_component kwok "$KWOK_BIN/kwok" "${cfg[@]}" \
    --kubeconfig "$PKI/kwok.kubeconfig" \
    --manage-all-nodes=false \
    --manage-nodes-with-annotation-selector kwok.x-k8s.io/node=fake \
    --server-address 127.0.0.1:10247 \
    --node-ip "$ip" --cidr 10.250.0.0/16 \
    --node-lease-duration-seconds 40
  wait_for kwok 180 "$KWOK_NODE_COUNT kwok nodes Ready" kwok_nodes_ready
}

main() {
  cluster_lock
  ensure_packages
  mkdir -p "$STATE" "$RUN" "$LOGS"
  bash "$CLUSTER_DIR/build.sh" || die "building cluster components failed"
  local ip
  ip=$(node_ip)
  ensure_registry
  push_images
  bash "$CLUSTER_DIR/pki.sh" "$ip"
  cp "$PKI/admin.kubeconfig" "$KUBECONFIG_PATH"
  write_configs "$ip"
  start_control_plane
  start_node "$ip"
  start_netpol
  start_kwok "$ip"
  cat >"$STATE/cluster.env" <<ENV
KUBECONFIG=$KUBECONFIG_PATH
KUBECTL=$KUBECTL
HELM=$HELM_BIN/helm
KUBE_ROUTER=$KUBE_ROUTER_BIN/kube-router
COSIGN=$COSIGN_BIN/cosign
REGISTRY=$REGISTRY
NODE_NAME=$NODE_NAME
PROBE_BINARY=$IMAGES_DIR/bin/probe
$(cat "$STATE/images.env")
ENV
  log "cluster up in $((SECONDS - started_at))s; kubeconfig: $KUBECONFIG_PATH"
  echo "$KUBECONFIG_PATH"
}

# Sourcing (for debugging single steps) defines the functions without running them.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  main "$@"
fi
