module evalrun.local/cluster/kube-router

go 1.21

require github.com/cloudnativelabs/kube-router/v2 v2.1.0
