#!/usr/bin/env bash
# Bring up the embedded default: dockerd (with gVisor registered) and the local
# OCI registry on 127.0.0.1:5000. Idempotent; starts only what is not running.
# State lives outside the checkout so fresh clones reuse it.
set -euo pipefail

STATE="${EVALRUN_HOST_STATE:-/var/lib/evalrun-host}"
REGISTRY_DIR="${EVALRUN_REGISTRY_DIR:-/var/lib/evalrun-registry}"
REGISTRY_ADDR="127.0.0.1:5000"
mkdir -p "$STATE" "$REGISTRY_DIR"

log() { printf '[host-up] %s\n' "$*" >&2; }

need_pkgs=()
command -v dockerd >/dev/null || need_pkgs+=(docker.io)
command -v runsc >/dev/null || need_pkgs+=(runsc)
command -v docker-registry >/dev/null || need_pkgs+=(docker-registry)
command -v mmdebstrap >/dev/null || need_pkgs+=(mmdebstrap)
command -v git >/dev/null || need_pkgs+=(git)
command -v curl >/dev/null || need_pkgs+=(curl)
command -v iptables >/dev/null || need_pkgs+=(iptables)
if ((${#need_pkgs[@]})); then
  log "installing: ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_pkgs[@]}" >"$STATE/apt.log" 2>&1 || { tail -20 "$STATE/apt.log"; exit 1; }
fi

# gVisor as a Docker runtime. --network=none is required on these hosts.
mkdir -p /etc/docker
want_daemon=$(python3 - <<'PY'
import json, pathlib
p = pathlib.Path("/etc/docker/daemon.json")
cfg = json.loads(p.read_text()) if p.exists() and p.read_text().strip() else {}
cfg.setdefault("runtimes", {})["runsc"] = {"path": "/usr/bin/runsc", "runtimeArgs": ["--network=none"]}
print(json.dumps(cfg, indent=2, sort_keys=True))
PY
)
daemon_changed=0
if [ "$(cat /etc/docker/daemon.json 2>/dev/null)" != "$want_daemon" ]; then
  printf '%s\n' "$want_daemon" >/etc/docker/daemon.json
  daemon_changed=1
fi

docker_ok() { docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

if docker_ok && [ "$daemon_changed" = 1 ]; then
  if [ -f "$STATE/dockerd.pid" ] && kill -0 "$(cat "$STATE/dockerd.pid")" 2>/dev/null; then
    log "reloading dockerd configuration"
    kill -HUP "$(cat "$STATE/dockerd.pid")"; sleep 1
  else
    log "warning: dockerd was started elsewhere; restart it to pick up the runsc runtime"
  fi
fi
if ! docker_ok; then
  log "starting dockerd (log: $STATE/dockerd.log)"
  nohup dockerd --pidfile "$STATE/dockerd.pid" >"$STATE/dockerd.log" 2>&1 &
  for _ in $(seq 1 60); do docker_ok && break; sleep 0.5; done
  docker_ok || { log "dockerd did not start:"; tail -30 "$STATE/dockerd.log" >&2; exit 1; }
fi
docker info --format '{{json .Runtimes}}' | grep -q runsc || { log "runsc runtime not registered in dockerd"; exit 1; }

registry_ok() { curl -fsS "http://$REGISTRY_ADDR/v2/" >/dev/null 2>&1; }
if ! registry_ok; then
  cat >"$STATE/registry.yml" <<YAML
version: 0.1
log:
  level: warn
  fields:
    service: registry
storage:
  filesystem:
    rootdirectory: $REGISTRY_DIR
  delete:
    enabled: true
http:
  addr: $REGISTRY_ADDR
YAML
  log "starting registry on $REGISTRY_ADDR (storage: $REGISTRY_DIR)"
  nohup docker-registry serve "$STATE/registry.yml" >"$STATE/registry.log" 2>&1 &
  echo $! >"$STATE/registry.pid"
  for _ in $(seq 1 40); do registry_ok && break; sleep 0.25; done
  registry_ok || { log "registry did not start:"; tail -30 "$STATE/registry.log" >&2; exit 1; }
fi
log "dockerd and registry ($REGISTRY_ADDR) are up"
