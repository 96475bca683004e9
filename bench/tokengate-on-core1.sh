#!/bin/sh
# tokengate pinned to CPU 1, for load generators pinned to CPU 0 (`taskset -c 0 ...`): pass this
# script as their --tokengate. TOKENGATE_BIN overrides the binary (default: the release build).
exec taskset -c 1 "${TOKENGATE_BIN:-$(dirname "$0")/../target/release/tokengate}" "$@"
