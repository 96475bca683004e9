#!/usr/bin/env bash
# The forged-token flood of RELIABILITY.md: builds tokengate at BEFORE (default: the commit
# before issue 12's work) in a temporary worktree, sharing this checkout's target directory
# (no copy of it), then runs `forged-flood` against that binary and this checkout's, each
# RUNS times.
#
#   reliability/forged-flood.sh [BEFORE] [N] [RUNS]
#
# Debug builds (as the test suite uses); set PROFILE=release for release builds.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
before=${1:-ca5ff8a}
n=${2:-2000}
runs=${3:-3}
profile=${PROFILE:-dev}
dir=$([ "$profile" = dev ] && echo debug || echo "$profile")
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target}
export CARGO_PROFILE_DEV_DEBUG=${CARGO_PROFILE_DEV_DEBUG:-line-tables-only}
out=$(mktemp -d)
trap 'git -C "$root" worktree remove --force "$out/before" 2>/dev/null || true; rm -rf "$out"' EXIT

git -C "$root" worktree add --detach "$out/before" "$before" >/dev/null
(cd "$out/before" && cargo build --profile "$profile" -p tokengate --bin tokengate)
cp "$CARGO_TARGET_DIR/$dir/tokengate" "$out/tokengate-before"
(cd "$root" && cargo build --profile "$profile" -p tokengate --bin tokengate -p tokengate-bench --bin forged-flood)
cp "$CARGO_TARGET_DIR/$dir/tokengate" "$out/tokengate-after"

for which in before after after-issuer; do
  bin=$out/tokengate-${which%-issuer}
  extra=()
  [ "$which" = after-issuer ] && extra=(--issuer-known)
  for i in $(seq "$runs"); do
    echo "== $which #$i"
    "$CARGO_TARGET_DIR/$dir/forged-flood" --tokengate "$bin" --n "$n" "${extra[@]}"
  done
done
