#!/usr/bin/env bash
# The README's test command: installs everything (scripts/setup.sh), then runs every test
# of the workspace (unit, stand-in conformance, gRPC, real-Envoy end-to-end, manifests).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export ENVOY_BIN="$PWD/.venv/bin/envoy"
cargo build --workspace --all-targets --locked
cargo nextest run --workspace --locked --no-fail-fast "$@"
