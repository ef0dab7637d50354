#!/usr/bin/env bash
# Install Kueue (pinned KUEUE_VERSION, built from its Go module by build.sh) into the
# running local cluster: its CRDs (server-side apply: the Workload CRD is too large
# for the last-applied annotation) and its controller manager, run on the host like
# kwok, with the admin kubeconfig. Only the batch/Job integration is on, and only
# Jobs that name a queue are managed (manageJobsWithoutQueueName: false), so every
# other test's Jobs are left alone. Kueue's webhooks are not registered: evalrun
# creates queued Jobs suspended itself. Idempotent.
# Usage: kueue-up.sh   (after up.sh)
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

KUEUE_STATE=$STATE/kueue
KUEUE_HEALTH_PORT=${EVALRUN_KUEUE_HEALTH_PORT:-18081}
# Kueue reads its metrics server certificate from this fixed path when it does not
# manage certificates itself (cmd/kueue/main.go); self-signed, metrics are not scraped.
KUEUE_METRICS_CERTS=/etc/kueue/metrics/certs

kueue_ready() { curl -fsS "http://127.0.0.1:$KUEUE_HEALTH_PORT/readyz" >/dev/null 2>&1; }

main() {
  bash "$CLUSTER_DIR/build.sh" kueue || die "building kueue $KUEUE_VERSION failed"
  cluster_lock
  [[ -f $KUBECONFIG_PATH ]] || die "no cluster (run tests/cluster/up.sh first)"
  mkdir -p "$KUEUE_STATE" "$KUEUE_STATE/webhook-certs"
  kc apply --server-side --force-conflicts -f "$KUEUE_DIR/crds/" >/dev/null \
    || die "applying Kueue $KUEUE_VERSION CRDs failed"
  kc wait --for condition=established --timeout=60s -f "$KUEUE_DIR/crds/" >/dev/null \
    || die "Kueue CRDs not established"
  kc get namespace kueue-system >/dev/null 2>&1 || kc create namespace kueue-system >/dev/null
  # the webhook server starts even unregistered: give it a self-signed pair
  for dir in "$KUEUE_STATE/webhook-certs" "$KUEUE_METRICS_CERTS"; do
    [[ -f $dir/tls.crt ]] && continue
    mkdir -p "$dir"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj /CN=kueue-local \
      -keyout "$dir/tls.key" -out "$dir/tls.crt" 2>/dev/null || die "cannot make $dir/tls.crt"
  done
  cat >"$KUEUE_STATE/config.yaml" <<CONFIG
apiVersion: config.kueue.x-k8s.io/v1beta2
kind: Configuration
namespace: kueue-system
health:
  healthProbeBindAddress: 127.0.0.1:$KUEUE_HEALTH_PORT
metrics:
  bindAddress: "0"
webhook:
  port: ${EVALRUN_KUEUE_WEBHOOK_PORT:-19443}
  host: 127.0.0.1
  certDir: $KUEUE_STATE/webhook-certs
leaderElection:
  leaderElect: false
internalCertManagement:
  enable: false
manageJobsWithoutQueueName: false
integrations:
  frameworks: ["batch/job"]
CONFIG
  # VisibilityOnDemand off: its API server wants certificates under /visibility (fixed).
  start_component kueue "$KUEUE_BIN/kueue" --config "$KUEUE_STATE/config.yaml" \
    --feature-gates VisibilityOnDemand=false \
    --kubeconfig "$PKI/admin.kubeconfig"
  wait_for kueue 120 "Kueue /readyz" kueue_ready
  log "kueue $KUEUE_VERSION ready"
}

main "$@"
