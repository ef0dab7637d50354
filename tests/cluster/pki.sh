#!/usr/bin/env bash
# Generate the cluster's CA, serving and client certificates, the service-account
# key pair and the kubeconfigs under $STATE/pki (idempotent: keeps what exists).
# Usage: pki.sh NODE_IP
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
node_ip=${1:?usage: pki.sh NODE_IP}
mkdir -p "$PKI" && chmod 700 "$PKI"
cd "$PKI"

newkey() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; chmod 600 "$1"; }

if [[ ! -f ca.crt ]]; then
  newkey ca.key
  openssl req -x509 -new -key ca.key -sha256 -days 3650 -subj "/CN=evalrun-cluster-ca" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out ca.crt
fi

# cert NAME SUBJECT EXTENDED_KEY_USAGE [SAN]
cert() {
  local name=$1 subj=$2 eku=$3 san=${4:-}
  [[ -f $name.crt ]] && return 0
  newkey "$name.key"
  local ext=(-addext "basicConstraints=critical,CA:FALSE"
             -addext "keyUsage=critical,digitalSignature,keyEncipherment"
             -addext "extendedKeyUsage=$eku")
  [[ -n $san ]] && ext+=(-addext "subjectAltName=$san")
  openssl req -new -key "$name.key" -subj "$subj" "${ext[@]}" -out "$name.csr"
  openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -sha256 \
    -days 3650 -copy_extensions copyall -out "$name.crt" 2>/dev/null
  rm -f "$name.csr"
}

cert apiserver "/CN=kube-apiserver" serverAuth \
  "IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" clientAuth
cert admin "/O=system:masters/CN=evalrun-admin" clientAuth
cert kube-controller-manager "/CN=system:kube-controller-manager" clientAuth
cert kube-scheduler "/CN=system:kube-scheduler" clientAuth
cert kubelet "/O=system:nodes/CN=system:node:$NODE_NAME" clientAuth
cert kubelet-serving "/O=system:nodes/CN=system:node:$NODE_NAME" serverAuth "IP:$node_ip,DNS:$NODE_NAME"
cert kwok "/O=system:masters/CN=evalrun-kwok" clientAuth
cert kube-router "/O=system:masters/CN=evalrun-kube-router" clientAuth

if [[ ! -f sa.key ]]; then
  newkey sa.key
  openssl pkey -in sa.key -pubout -out sa.pub
fi

# kubeconfig NAME USER: a kubeconfig with embedded credentials for USER's cert.
kubeconfig() {
  local file=$1 user=$2
  local b64='base64 -w0'
  cat >"$file.tmp" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters:
- name: evalrun
  cluster:
    server: https://127.0.0.1:$APISERVER_PORT
    certificate-authority-data: $($b64 ca.crt)
users:
- name: $user
  user:
    client-certificate-data: $($b64 "$user.crt")
    client-key-data: $($b64 "$user.key")
contexts:
- name: evalrun
  context: {cluster: evalrun, user: $user}
current-context: evalrun
KUBECONFIG
  chmod 600 "$file.tmp" && mv "$file.tmp" "$file"
}
for u in admin kube-controller-manager kube-scheduler kubelet kwok kube-router; do
  [[ -f $u.kubeconfig ]] || kubeconfig "$u.kubeconfig" "$u"
done
