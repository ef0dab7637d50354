#!/usr/bin/env bash
# Control one component of a running local cluster (used by tests, e.g. to
# restart the API server under a watching client).
# Usage: component.sh {start|stop|restart|status} NAME
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

action=${1:?usage: component.sh start|stop|restart|status NAME}
name=${2:?usage: component.sh start|stop|restart|status NAME}
[[ $action == status ]] || cluster_lock
[[ -f $RUN/$name.cmd ]] || die "$name was never started by up.sh (no $RUN/$name.cmd)"

case $action in
  stop) stop_component "$name" ;;
  start) running "$name" || launch_component "$name" ;;
  restart) stop_component "$name"; launch_component "$name" ;;
  status) if running "$name"; then echo "running pid $(cat "$RUN/$name.pid")"; else echo stopped; exit 3; fi ;;
  *) die "unknown action $action" ;;
esac
if [[ $action == start || $action == restart ]] && [[ $name == kube-apiserver ]]; then
  wait_for kube-apiserver 120 "API server /readyz" kc get --raw /readyz
  log "kube-apiserver ready"
fi
