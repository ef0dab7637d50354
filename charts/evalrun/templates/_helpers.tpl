{{- define "evalrun.labels" -}}
app.kubernetes.io/name: evalrun
app.kubernetes.io/part-of: evalrun
app.kubernetes.io/managed-by: evalrun-chart
{{- end -}}


{{/* The runner's namespaced rules: what `evalrun run --backend kubernetes` calls, no Secrets. */}}
{{- define "evalrun.runnerRules" -}}
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["create", "get", "list", "watch", "patch", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
- apiGroups: [""]
  resources: ["pods/log"]
  verbs: ["get"]
# Results leave the held, finished pod through the exec stream (emit-results, then ack).
# The websocket upgrade is a GET; Kubernetes >= 1.35 also checks create.
- apiGroups: [""]
  resources: ["pods/exec"]
  verbs: ["create", "get"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["create", "get", "delete"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["get", "list", "watch"]
# Before submitting, the runner checks this namespace enforces the sandbox policy (Pod
# Security label, default-deny NetworkPolicy) and records what it observed in the bundle.
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["get"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["list"]
# Kueue: why a queued run waits (its Workload) and how many wait before it (LocalQueue).
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloads", "localqueues"]
  verbs: ["get", "list"]
{{- end -}}
