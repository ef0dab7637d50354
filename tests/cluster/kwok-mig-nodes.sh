#!/usr/bin/env bash
# Print the kwok-managed fake MIG nodes as a YAML stream: H100 nodes whose 8 GPUs are
# partitioned by the NVIDIA MIG manager and advertised by the device plugin's "mixed"
# strategy (one resource per profile: nvidia.com/mig-<profile>), with the labels GPU
# feature discovery sets for it. Their capacity is set by up.sh (node status).
#   kwok-mig-000: all-1g.10gb (7 per GPU: 56)    kwok-mig-001: all-3g.40gb (2 per GPU: 16)
# Usage: kwok-mig-nodes.sh          (prints NAME PROFILE COUNT lines with --capacity)
set -euo pipefail
NODES=("kwok-mig-000 1g.10gb 56 10240 1 1" "kwok-mig-001 3g.40gb 16 40448 3 3")
if [[ ${1:-} == --capacity ]]; then
  for n in "${NODES[@]}"; do set -- $n; echo "$1 $2 $3"; done
  exit 0
fi
for n in "${NODES[@]}"; do
  set -- $n
  name=$1 profile=$2 count=$3 memory=$4 slices=$5 engines=$6
  cat <<NODE
---
apiVersion: v1
kind: Node
metadata:
  name: $name
  annotations:
    kwok.x-k8s.io/node: fake
    node.alpha.kubernetes.io/ttl: "0"
  labels:
    type: kwok-mig
    kubernetes.io/arch: amd64
    kubernetes.io/os: linux
    kubernetes.io/hostname: $name
    node.kubernetes.io/instance-type: evalrun-fake-8xhopper-mig
    nvidia.com/gpu.present: "true"
    nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3
    nvidia.com/gpu.family: hopper
    nvidia.com/gpu.count: "8"
    nvidia.com/gpu.memory: "81559"
    nvidia.com/cuda.driver.major: "550"
    nvidia.com/cuda.driver.minor: "127"
    nvidia.com/cuda.driver.rev: "05"
    nvidia.com/mig.capable: "true"
    nvidia.com/mig.strategy: mixed
    nvidia.com/mig.config: all-$profile
    nvidia.com/mig.config.state: success
    nvidia.com/mig-$profile.count: "$count"
    nvidia.com/mig-$profile.memory: "$memory"
    nvidia.com/mig-$profile.slices.gi: "$slices"
    nvidia.com/mig-$profile.slices.ci: "$slices"
    nvidia.com/mig-$profile.engines.copy: "$engines"
    nvidia.com/mig-$profile.product: NVIDIA-H100-80GB-HBM3-MIG-$profile
spec:
  taints:
  - {key: kwok.x-k8s.io/node, value: fake, effect: NoSchedule}
  - {key: nvidia.com/gpu, value: present, effect: NoSchedule}
NODE
done
