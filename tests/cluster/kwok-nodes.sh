#!/usr/bin/env bash
# Print N kwok-managed fake GPU nodes (8 GPUs each, realistic NVIDIA GPU feature
# discovery labels, GPU + kwok taints) as a YAML stream. The first half are H100
# nodes, the second half A100 nodes, so product nodeSelectors mean something.
# Usage: kwok-nodes.sh N
set -euo pipefail
n=${1:?usage: kwok-nodes.sh N}
for ((i = 0; i < n; i++)); do
  if ((i < (n + 1) / 2)); then
    product=NVIDIA-H100-80GB-HBM3 family=hopper memory=81559 compute_major=9 compute_minor=0
  else
    product=NVIDIA-A100-SXM4-80GB family=ampere memory=81920 compute_major=8 compute_minor=0
  fi
  name=$(printf 'kwok-gpu-%03d' "$i")
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
    type: kwok
    kubernetes.io/arch: amd64
    kubernetes.io/os: linux
    kubernetes.io/hostname: $name
    node.kubernetes.io/instance-type: evalrun-fake-8x$family
    topology.kubernetes.io/zone: evalrun-zone-$((i % 3))
    nvidia.com/gpu.present: "true"
    nvidia.com/gpu.product: $product
    nvidia.com/gpu.family: $family
    nvidia.com/gpu.count: "8"
    nvidia.com/gpu.memory: "$memory"
    nvidia.com/gpu.compute.major: "$compute_major"
    nvidia.com/gpu.compute.minor: "$compute_minor"
    nvidia.com/cuda.driver.major: "550"
    nvidia.com/cuda.driver.minor: "127"
    nvidia.com/cuda.driver.rev: "05"
    nvidia.com/cuda.runtime.major: "12"
    nvidia.com/cuda.runtime.minor: "4"
    nvidia.com/mig.capable: "true"
spec:
  taints:
  - {key: kwok.x-k8s.io/node, value: fake, effect: NoSchedule}
  - {key: nvidia.com/gpu, value: present, effect: NoSchedule}
NODE
done
