#!/bin/sh
# One-shot set-up for the compose demo (runs in the k3s image: sh + kubectl).
# Creates the seeds' identities and writes credentials to /creds:
#   admin.kubeconfig       cluster-admin (for you: docker compose cp setup:/creds/admin.kubeconfig .)
#   ca.crt                 the API server's CA
#   tokengate.kubeconfig   tokengate's reviewer identity (may only create tokenreviews)
#   api-minter.token       may only create tokens for serviceaccount api/api (the kubelet's role)
set -eu

sed 's#https://127.0.0.1:6443#https://k3s:6443#' /output/kubeconfig.yaml > /creds/admin.kubeconfig
export KUBECONFIG=/creds/admin.kubeconfig

kubectl apply -f - <<'YAML'
apiVersion: v1
kind: Namespace
metadata: {name: api}
---
apiVersion: v1
kind: Namespace
metadata: {name: data-store}
---
apiVersion: v1
kind: Namespace
metadata: {name: tokengate}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: api, namespace: api}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: tokengate, namespace: tokengate}
---
# Only create on tokenreviews, as deploy/base/rbac.yaml (system:auth-delegator would also
# grant subjectaccessreviews).
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: tokengate-tokenreview}
rules:
- {apiGroups: [authentication.k8s.io], resources: [tokenreviews], verbs: [create]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: tokengate-tokenreview}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: tokengate-tokenreview}
subjects:
- {kind: ServiceAccount, name: tokengate, namespace: tokengate}
---
apiVersion: v1
kind: Secret
metadata:
  name: tokengate-reviewer
  namespace: tokengate
  annotations: {kubernetes.io/service-account.name: tokengate}
type: kubernetes.io/service-account-token
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: token-minter, namespace: api}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: mint-api-token, namespace: api}
rules:
- apiGroups: [""]
  resources: [serviceaccounts/token]
  resourceNames: [api]
  verbs: [create]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: token-minter, namespace: api}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: mint-api-token}
subjects:
- {kind: ServiceAccount, name: token-minter, namespace: api}
---
apiVersion: v1
kind: Secret
metadata:
  name: token-minter
  namespace: api
  annotations: {kubernetes.io/service-account.name: token-minter}
type: kubernetes.io/service-account-token
YAML

# The token controller fills the two Secrets asynchronously.
secret_token() { # namespace name
  i=0
  while [ $i -lt 60 ]; do
    t=$(kubectl -n "$1" get secret "$2" -o jsonpath='{.data.token}' 2>/dev/null || true)
    if [ -n "$t" ]; then echo "$t" | base64 -d; return 0; fi
    i=$((i + 1)); sleep 1
  done
  echo "setup: secret $1/$2 never got a token" >&2; return 1
}
reviewer_token=$(secret_token tokengate tokengate-reviewer)
secret_token api token-minter > /creds/api-minter.token

kubectl config view --raw -o jsonpath='{.clusters[0].cluster.certificate-authority-data}' \
  | base64 -d > /creds/ca.crt

cat > /creds/tokengate.kubeconfig <<KCFG
apiVersion: v1
kind: Config
clusters:
- name: k3s
  cluster: {server: "https://k3s:6443", certificate-authority: /creds/ca.crt}
users:
- name: tokengate
  user: {token: "$reviewer_token"}
contexts:
- name: tokengate
  context: {cluster: k3s, user: tokengate}
current-context: tokengate
KCFG

# tokengate and the api run as non-root users.
chmod 0644 /creds/*
echo "setup: done"
