#!/usr/bin/env bash
# Build every pinned cluster component that is missing from the cache.
# Each component is built from its Go module through a small wrapper module
# (tests/cluster/gomod/), so nothing but the Go module proxy is needed.
# Usage: build.sh [component...]   (default: all)
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# build_wrapper NAME VERSION OUTDIR LDFLAGS PKG...
# Builds PKGs in the wrapper module whose go.mod is already in OUTDIR/src,
# seeding go.sum from the committed lock so downloads are checked against it.
build_wrapper() {
  local name=$1 version=$2 out=$3 ldflags=$4; shift 4
  local src=$out/src lock=$CLUSTER_DIR/gomod/$name
  [[ -f $lock/go.sum ]] && cp "$lock/go.sum" "$src/go.sum"
  log "building $name $version (-p $GO_BUILD_P) -> $out/bin"
  local start=$SECONDS
  (cd "$src" && "$GO" build -mod=mod -trimpath -p "$GO_BUILD_P" -ldflags "$ldflags" \
      -o "$out/bin.tmp/" "$@") >"$out/build.log" 2>&1 \
    || { tail -n 40 "$out/build.log" >&2; die "build of $name $version failed (log: $out/build.log)"; }
  rm -rf "$out/bin" && mv "$out/bin.tmp" "$out/bin"
  echo "$((SECONDS - start))" >"$out/build-seconds"
  # Record the wrapper module and its checksums next to this script; commit them
  # after a version bump so the next cold build verifies against them.
  mkdir -p "$lock" && cp "$src/go.mod" "$src/go.sum" "$lock/"
  log "built $name $version in $((SECONDS - start))s"
}

# A wrapper module requiring MODULE@VERSION, with MODULE's go/godebug lines copied.
# Prints the path of MODULE's upstream go.mod.
new_wrapper() {
  local name=$1 module=$2 version=$3 out=$4
  rm -rf "$out/src" "$out/bin.tmp" && mkdir -p "$out/src"
  local upstream
  upstream=$(cd "$out/src" && "$GO" mod download -json "$module@$version" \
    | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
  [[ -f $upstream ]] || die "cannot download $module@$version from the Go module proxy"
  {
    echo "module evalrun.local/cluster/$name"
    echo
    grep -E '^go [0-9.]+$' "$upstream"
    grep -E '^godebug ' "$upstream" || true
    echo
    echo "require $module $version"
  } >"$out/src/go.mod"
  echo "$upstream"
}

# have DIR BINARY...: all BINARYs are built in DIR. The first call for a DIR takes
# its build lock (held until exit), so concurrent builds of one component wait
# for each other instead of racing.
declare -A LOCKED=()
have() {
  local d=$1 fd; shift
  if [[ -z ${LOCKED[$d]:-} ]]; then
    mkdir -p "$d"
    exec {fd}>"$d.lock"
    flock "$fd"
    LOCKED[$d]=$fd
  fi
  for b in "$@"; do [[ -x $d/bin/$b ]] || return 1; done
}

build_kubernetes() {
  local out=$CACHE/kubernetes-$KUBERNETES_VERSION
  have "$out" kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl && return 0
  local upstream
  upstream=$(new_wrapper kubernetes k8s.io/kubernetes "$KUBERNETES_VERSION" "$out")
  # Upstream points every k8s.io/* staging module at ./staging/src/...; those
  # replaces do not apply to us, and the required v0.0.0 does not exist, so map
  # each one to its published release (a missing one fails: unknown revision v0.0.0).
  {
    echo
    echo "replace ("
    grep -oE '^[[:space:]]*k8s\.io/[A-Za-z0-9._-]+ => \./staging/src/' "$upstream" \
      | awk -v v="$KUBERNETES_STAGING_VERSION" '{print "\t" $1 " => " $1 " " v}'
    echo ")"
  } >>"$out/src/go.mod"
  local major minor v=$KUBERNETES_VERSION
  major=${v#v}; major=${major%%.*}; minor=${v#v*.}; minor=${minor%%.*}
  local ld="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $pkg.gitVersion=$v -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    ld+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  build_wrapper kubernetes "$v" "$out" "$ld" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubelet \
    k8s.io/kubernetes/cmd/kubectl
}

build_etcd() {
  local out=$CACHE/etcd-$ETCD_VERSION
  have "$out" etcd && return 0
  new_wrapper etcd go.etcd.io/etcd/server/v3 "$ETCD_VERSION" "$out" >/dev/null
  build_wrapper etcd "$ETCD_VERSION" "$out" "-s -w" go.etcd.io/etcd/server/v3
  mv "$out/bin/v3" "$out/bin/etcd" 2>/dev/null || mv "$out/bin/server" "$out/bin/etcd" 2>/dev/null || true
  have "$out" etcd || die "etcd binary missing after build (see $out/bin)"
}

build_kwok() {
  local out=$CACHE/kwok-$KWOK_VERSION
  have "$out" kwok && return 0
  new_wrapper kwok sigs.k8s.io/kwok "$KWOK_VERSION" "$out" >/dev/null
  build_wrapper kwok "$KWOK_VERSION" "$out" \
    "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION" sigs.k8s.io/kwok/cmd/kwok
  # kwok's own "fast" stage set (what its kustomize/stage/fast deploys): node
  # initialize + heartbeat-with-lease, pod ready/complete/delete.
  local dir
  dir=$(cd "$out/src" && "$GO" mod download -json "sigs.k8s.io/kwok@$KWOK_VERSION" \
    | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  mkdir -p "$out/stages"
  for f in node/fast/node-initialize node/heartbeat-with-lease/node-heartbeat-with-lease \
           pod/fast/pod-ready pod/fast/pod-complete pod/fast/pod-delete; do
    cp "$dir/kustomize/stage/$f.yaml" "$out/stages/"
  done
  chmod -R u+w "$out/stages"
}

build_helm() {
  local out=$CACHE/helm-$HELM_VERSION
  have "$out" helm && return 0
  new_wrapper helm helm.sh/helm/v3 "$HELM_VERSION" "$out" >/dev/null
  build_wrapper helm "$HELM_VERSION" "$out" \
    "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" helm.sh/helm/v3/cmd/helm
}

build_cosign() {
  local out=$CACHE/cosign-$COSIGN_VERSION
  have "$out" cosign && return 0
  new_wrapper cosign github.com/sigstore/cosign/v3 "$COSIGN_VERSION" "$out" >/dev/null
  build_wrapper cosign "$COSIGN_VERSION" "$out" \
    "-s -w -X sigs.k8s.io/release-utils/version.gitVersion=$COSIGN_VERSION" \
    github.com/sigstore/cosign/v3/cmd/cosign
}

# kube-router, only as the NetworkPolicy enforcer (firewall controller).
build_kuberouter() {
  local out=$CACHE/kube-router-$KUBE_ROUTER_VERSION
  have "$out" kube-router && return 0
  new_wrapper kube-router github.com/cloudnativelabs/kube-router/v2 "$KUBE_ROUTER_VERSION" "$out" >/dev/null
  build_wrapper kube-router "$KUBE_ROUTER_VERSION" "$out" \
    "-s -w -X github.com/cloudnativelabs/kube-router/v2/pkg/version.Version=$KUBE_ROUTER_VERSION" \
    github.com/cloudnativelabs/kube-router/v2/cmd/kube-router
}

# containerd-shim-runsc-v1: the runc shim cannot run gVisor subcontainers
# properly (it waits on the sandbox pid, so a pod's containers never exit).
# Patched (tests/cluster/patches/gvisor-*.patch): see docs/cluster.md.
build_gvisor() {
  local out
  out=$(dirname "$GVISOR_BIN")
  have "$out" containerd-shim-runsc-v1 && return 0
  new_wrapper gvisor gvisor.dev/gvisor "$GVISOR_SHIM_VERSION" "$out" >/dev/null
  local dir
  dir=$(cd "$out/src" && "$GO" mod download -json "gvisor.dev/gvisor@$GVISOR_SHIM_VERSION" \
    | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  rm -rf "$out/gvisor" && cp -r "$dir" "$out/gvisor" && chmod -R u+w "$out/gvisor"
  for p in "$CLUSTER_DIR"/patches/gvisor-*.patch; do
    patch -s -p1 -d "$out/gvisor" <"$p" || die "patch $p does not apply to gvisor $GVISOR_SHIM_VERSION"
  done
  printf '\nreplace gvisor.dev/gvisor => ../gvisor\n' >>"$out/src/go.mod"
  build_wrapper gvisor "$GVISOR_SHIM_VERSION" "$out" "-s -w" gvisor.dev/gvisor/shim
  mv "$out/bin/shim" "$out/bin/containerd-shim-runsc-v1"
}

# containerd 2.x (CRI plugin included): the node's container runtime. Needs >= 2.1
# for Kubernetes image volumes. CGO_ENABLED=0, so the btrfs snapshotter (cgo)
# is left out, as the config disables it anyway.
build_containerd() {
  local out=$CONTAINERD_DIR
  have "$out" containerd ctr containerd-shim-runc-v2 && return 0
  new_wrapper containerd github.com/containerd/containerd/v2 "$CONTAINERD_VERSION" "$out" >/dev/null
  local pkg=github.com/containerd/containerd/v2
  build_wrapper containerd "$CONTAINERD_VERSION" "$out" \
    "-s -w -X $pkg/version.Version=$CONTAINERD_VERSION -X $pkg/version.Package=$pkg" \
    $pkg/cmd/containerd $pkg/cmd/ctr $pkg/cmd/containerd-shim-runc-v2
}

# SeaweedFS `weed`: the S3-compatible server the tests start (tests/cluster/s3.py).
# Upstream has no semver tags, so the pin is a pseudo-version. Its non-local
# replace lines (a fork standing in for a deleted repository) are copied.
build_seaweedfs() {
  local out=$SEAWEEDFS_DIR
  have "$out" weed && return 0
  local upstream
  upstream=$(new_wrapper seaweedfs github.com/seaweedfs/seaweedfs "$SEAWEEDFS_VERSION" "$out")
  { echo; grep -E '^replace [^ ]+ => [^./][^ ]* v[^ ]+$' "$upstream" || true; } >>"$out/src/go.mod"
  build_wrapper seaweedfs "$SEAWEEDFS_VERSION" "$out" "-s -w" github.com/seaweedfs/seaweedfs/weed
}

# Kueue's controller manager (run as a host process against the API server, like
# kwok) plus its CRDs, copied from the same module so both match the version.
build_kueue() {
  local out=$KUEUE_DIR
  have "$out" kueue && [[ -d $out/crds ]] && return 0
  local upstream
  upstream=$(new_wrapper kueue sigs.k8s.io/kueue "$KUEUE_VERSION" "$out")
  { echo; grep -E '^replace [^ ]+ => [^./][^ ]* v[^ ]+$' "$upstream" || true; } >>"$out/src/go.mod"
  build_wrapper kueue "$KUEUE_VERSION" "$out" \
    "-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion=$KUEUE_VERSION" sigs.k8s.io/kueue/cmd/kueue
  local dir
  dir=$(cd "$out/src" && "$GO" mod download -json "sigs.k8s.io/kueue@$KUEUE_VERSION" \
    | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  rm -rf "$out/crds" && mkdir -p "$out/crds"
  cp "$dir"/config/components/crd/bases/*.yaml "$out/crds/"
  chmod -R u+w "$out/crds"
}

# The pause and probe images' binaries; keyed by a hash of their sources.
build_images() {
  local out=$IMAGES_DIR
  have "$out" pause probe && return 0
  mkdir -p "$out"
  log "building pause + probe image binaries -> $out/bin"
  (cd "$CLUSTER_DIR/images" && "$GO" build -trimpath -p "$GO_BUILD_P" -ldflags "-s -w" \
      -o "$out/bin.tmp/" ./pause ./probe) >"$out/build.log" 2>&1 \
    || { tail -n 40 "$out/build.log" >&2; die "build of the pause/probe binaries failed"; }
  rm -rf "$out/bin" && mv "$out/bin.tmp" "$out/bin"
}

[[ -x $GO ]] || die "Go toolchain not found at $GO (set EVALRUN_GO)"
mkdir -p "$CACHE"
components=("$@")
[[ ${#components[@]} -gt 0 ]] || components=(kubernetes etcd containerd kwok helm cosign gvisor kuberouter seaweedfs images)
for c in "${components[@]}"; do "build_$c"; done
