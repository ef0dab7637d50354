{{- define "evalrun.labels" -}}
app.kubernetes.io/name: evalrun
app.kubernetes.io/part-of: evalrun
app.kubernetes.io/managed-by: evalrun-chart
{{- end -}}
