#!/usr/bin/env bash
# bench/run.sh: tokengate side by side with Envoy alone, Envoy's jwt_authn and a null
# ext_authz server, in one run, alternating, on this machine. See BENCHMARKS.md.
#
#   bench/run.sh                  # full run (~7 min): 3 × 10 s saturation rounds, 10 s latency runs
#   BENCH_QUICK=1 bench/run.sh    # quick run (~2 min): 3 × 3 s rounds, 3 s latency runs, 20k fill
#
# Knobs (environment): BENCH_ROUNDS, BENCH_SAT_SECS, BENCH_LAT_SECS, BENCH_RATE (fixed rate for
# latency, default 2000 rps), BENCH_LAT_ROUNDS (latency runs per scenario, 1), BENCH_CONNS (wrk
# connections, 32), BENCH_ENVOY_CONCURRENCY (Envoy workers, 1; wrk threads follow it),
# BENCH_MISS_LATENCY_MS (stand-in TokenReview delay, 2),
# BENCH_POOL (cache-miss tokens), BENCH_ALG (signing key of the pool tokens: es256, the default,
# mints fast; rs256 is what most clusters use), BENCH_FILL (identities for the RSS measurement, 100000),
# BENCH_NULL_WORKERS (null server tokio workers, 2; 0 = current-thread), BENCH_TG_WORKERS
# (tokengate --worker-threads; unset = its default), BENCH_SCENARIOS (space-separated subset),
# BENCH_ISSUE9 (issue 9's revocation / restart / watch-RSS measurements: 1 by default when
# tokengate_miss_local runs), BENCH_REVOCATIONS (50), BENCH_RESTART_CALLERS (10000),
# BENCH_WATCH_PODS (100000), BENCH_WATCH_SAS (10000),
# BENCH_INSTRUCTIONS (instructions per Check under callgrind, plain vs. peer + RBAC hit: 1 by
# default when check_tokengate_peer runs), BENCH_INSTR_CHECKS (Checks per callgrind window, 20000),
# BENCH_OUT (results directory), ENVOY_BIN, TOKENGATE_BIN (another tokengate build to measure), BENCH_PROFILE=1 (perf-record the ext_authz server,
# and Envoy, in an extra unrecorded round after the measured ones: profile-*.txt in the results).
#
# Everything listens on 127.0.0.1 on free ports; every process started here is stopped on exit.
# Results: $BENCH_OUT (default target/bench/<UTC time>/): summary.md, sat.tsv, lat.jsonl,
# cpu.tsv, extra.txt, env.txt, logs/.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

QUICK=${BENCH_QUICK:-0}
if [[ $QUICK == 1 ]]; then
  ROUNDS=${BENCH_ROUNDS:-3}; SAT=${BENCH_SAT_SECS:-3}; LAT=${BENCH_LAT_SECS:-3}
  FILL=${BENCH_FILL:-20000}; POOL=${BENCH_POOL:-40000}
else
  ROUNDS=${BENCH_ROUNDS:-3}; SAT=${BENCH_SAT_SECS:-10}; LAT=${BENCH_LAT_SECS:-10}
  FILL=${BENCH_FILL:-100000}; POOL=${BENCH_POOL:-80000}
fi
RATE=${BENCH_RATE:-2000}
LAT_ROUNDS=${BENCH_LAT_ROUNDS:-1}
CONNS=${BENCH_CONNS:-32}
CONC=${BENCH_ENVOY_CONCURRENCY:-1}
MISS_MS=${BENCH_MISS_LATENCY_MS:-2}
NULL_WORKERS=${BENCH_NULL_WORKERS:-2}
ALL_SCENARIOS="noauth jwt_nocache jwt_cache extauthz_null extauthz_null_hdrs tokengate_hit tokengate_hit_http tokengate_hit_h2c tokengate_miss tokengate_miss_local check_null check_tokengate check_tokengate_peer"
SCENARIOS=${BENCH_SCENARIOS:-$ALL_SCENARIOS}
ENVOY=${ENVOY_BIN:-$ROOT/.venv/bin/envoy}
OUT=${BENCH_OUT:-$ROOT/target/bench/$(date -u +%Y%m%dT%H%M%SZ)}
BIN=$ROOT/target/release
TG_BIN=${TOKENGATE_BIN:-$BIN/tokengate}
# tokengate (and the stand-in) are only needed when a tokengate scenario is selected.
TG=0; [[ $SCENARIOS == *tokengate* ]] && TG=1
# A tokengate with `verification: local` (watch on) only for the local cache-miss scenario.
LOCAL=0; [[ $SCENARIOS == *tokengate_miss_local* ]] && LOCAL=1
ALG=${BENCH_ALG:-es256}
# Issue 9's measurements (tokengate-bench revocation / restart-reviews / watch-rss) after the
# saturation and latency runs; on by default when the local scenario runs.
ISSUE9=${BENCH_ISSUE9:-$LOCAL}
# Instructions per Check under callgrind, plain hit vs. peer + RBAC hit (counts, immune to the
# machine's load); on by default when check_tokengate_peer runs.
INSTR=0; [[ $SCENARIOS == *check_tokengate_peer* ]] && INSTR=1
INSTR=${BENCH_INSTRUCTIONS:-$INSTR}; INSTR_N=${BENCH_INSTR_CHECKS:-20000}
REV_N=${BENCH_REVOCATIONS:-50}; RR_N=${BENCH_RESTART_CALLERS:-10000}
RSS_PODS=${BENCH_WATCH_PODS:-100000}; RSS_SAS=${BENCH_WATCH_SAS:-10000}
mkdir -p "$OUT/logs" "$OUT/conf"
: > "$OUT/sat.tsv"; : > "$OUT/lat.jsonl"; : > "$OUT/cpu.tsv"; : > "$OUT/extra.txt"

log() { printf '[bench %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }

for tool in wrk h2load curl; do
  command -v $tool >/dev/null || die "$tool not found (apt-get install -y wrk nghttp2-client curl)"
done
if ((INSTR)); then
  command -v callgrind_control >/dev/null || die "valgrind not found (apt-get install -y valgrind)"
fi
[[ -x $ENVOY ]] || die "Envoy not found at $ENVOY (set ENVOY_BIN)"

# ---- build ------------------------------------------------------------------------------
log "building release binaries (tokengate, tokengate-bench, null-authz)"
if ((TG)); then
  cargo build --release -p tokengate -p tokengate-bench 2>&1 | tail -n 3 >&2
else
  cargo build --release -p tokengate-bench 2>&1 | tail -n 3 >&2
fi

# ---- processes --------------------------------------------------------------------------
declare -A PIDS=()
cleanup() {
  for name in "${!PIDS[@]}"; do kill "${PIDS[$name]}" 2>/dev/null || true; done
  for name in "${!PIDS[@]}"; do wait "${PIDS[$name]}" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# spawn NAME CMD...: start in the background, stdout+stderr to logs/NAME.log.
spawn() {
  local name=$1; shift
  "$@" > "$OUT/logs/$name.log" 2>&1 &
  PIDS[$name]=$!
}
stop() {
  local name=$1
  [[ -n ${PIDS[$name]:-} ]] || return 0
  kill "${PIDS[$name]}" 2>/dev/null || true
  wait "${PIDS[$name]}" 2>/dev/null || true
  unset "PIDS[$name]"
}
# wait_for DESC TIMEOUT_S CMD...: poll CMD every 50 ms.
wait_for() {
  local desc=$1 limit=$2; shift 2
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "timed out waiting for $desc"
    sleep 0.05
  done
}
ready_line() { grep -m1 '^ready ' "$OUT/logs/$1.log"; }


# ---- the Kubernetes API stand-in, with pre-minted tokens -----------------------------------
SDIR=$OUT/standin
if ((!TG)); then POOL=0; FILL=0; fi
log "starting the API stand-in and minting $((8 + POOL + FILL)) tokens"
# The reviewer may list/watch pods and service accounts (verification: local, watch).
spawn standin "$BIN/tokengate-bench" standin --dir "$SDIR" --pool "$POOL" --fill "$FILL" --single 8 \
  --alg "$ALG" --grant-reviewer-watch
wait_for "stand-in ready" 180 ready_line standin
STANDIN_URL=$(ready_line standin | awk '{print $2}')
ADMIN_TOKEN=$(cat "$SDIR/admin-token")
standin_api() { # METHOD PATH [JSON]
  curl -sS --fail --cacert "$SDIR/ca.crt" -H "Authorization: Bearer $ADMIN_TOKEN" \
    -H 'content-type: application/json' -X "$1" "$STANDIN_URL$2" ${3:+-d "$3"}
}
# set_latency MS: TokenReview answers wait MS (0 = no fault at all: even a zero sleep costs a
# tokio timer tick, up to 1 ms). Note tokio timers round up to whole milliseconds, so "2 ms"
# is 2-3 ms in practice.
set_latency() {
  if (($1 == 0)); then
    standin_api POST /standin/v1/fault '{"kind":"none"}' >/dev/null
  else
    standin_api POST /standin/v1/fault "{\"kind\":\"latency\",\"ms\":$1}" >/dev/null
  fi
}
reviews() { standin_api GET /standin/v1/counters | sed -E 's/.*"token_reviews":([0-9]+).*/\1/'; }
HIT_TOKEN=$(sed -n 1p "$SDIR/single.txt")

# Free ports, chosen only now: minting takes a while, and a port picked before it may have been
# taken (as an ephemeral port) by then.
read -r -a P <<<"$("$BIN/tokengate-bench" ports 40 | tr '\n' ' ')"
port_i=0
# take_port VAR: assign the next free port to VAR (no subshell, so the counter advances).
take_port() { printf -v "$1" '%s' "${P[$port_i]}"; port_i=$((port_i + 1)); }

# ---- tokengate instances ------------------------------------------------------------------
# tg_config NAME GRPC_PORT ADMIN_PORT [VERIFICATION] [HTTP_PORT]: writes
# conf/tokengate-NAME.yaml, prints its path. VERIFICATION `local` adds `verification: local`
# (which implies the watch); `-` or empty keeps TokenReview. With HTTP_PORT the HTTP front door
# listens there too (same process, same cache), under the path prefix /authz.
tg_config() {
  local f=$OUT/conf/tokengate-$1.yaml local_lines="" http_lines=""
  [[ ${4:-} == local ]] && local_lines=$'\n  verification: local\n  watch: true\n  max_staleness: 5m'
  [[ -n ${5:-} ]] && http_lines=$'\n  http: 127.0.0.1:'"$5"$'\n  http_path_prefix: /authz'
  cat > "$f" <<EOF
listen:
  grpc: 127.0.0.1:$2
  admin: 127.0.0.1:$3$http_lines
kubernetes:
  kubeconfig: $SDIR/kubeconfig
  timeout: 2s
  retries: 0
  max_in_flight: 64
  trust_domain: cluster.local$local_lines
token_sources:
  - header: authorization
    scheme: Bearer
routes:
  - name: bench
    match:
      context_extensions: {route: bench}
    audiences: [tokengate-bench]
  - name: bench-peer            # check_tokengate_peer: the same token, bound to its mTLS peer,
    match:                      # and admitted by RBAC (a SubjectAccessReview, cached)
      context_extensions: {route: bench-peer}
    audiences: [tokengate-bench]
    require_peer: service_account
    allow:
      rbac:
        verb: get
        non_resource_path: /bench
cache:
  max_entries: 100000
  ttl: 60s
  negative_ttl: 5s
log:
  format: text
  level: warn
EOF
  echo "$f"
}
declare -A TG_GRPC=() TG_ADMIN=() TG_HTTP=()
start_tokengate() { # NAME
  local name=tokengate-$1
  spawn "$name" "$TG_BIN" serve --config "$OUT/conf/$name.yaml" \
    ${BENCH_TG_WORKERS:+--worker-threads "$BENCH_TG_WORKERS"}
  wait_for "$name ready" 30 curl -sf "http://127.0.0.1:${TG_ADMIN[$1]}/readyz"
}
for t in hit miss; do
  take_port "TG_GRPC[$t]"; take_port "TG_ADMIN[$t]"
  [[ $t == hit ]] && take_port "TG_HTTP[$t]"
  tg_config "$t" "${TG_GRPC[$t]}" "${TG_ADMIN[$t]}" - "${TG_HTTP[$t]:-}" >/dev/null
  ((TG)) && start_tokengate $t
done
((TG)) && log "tokengate hit :${TG_GRPC[hit]} (http :${TG_HTTP[hit]})  miss :${TG_GRPC[miss]}"
# missl: the same cache-miss setting with `verification: local`.
if ((LOCAL)); then
  take_port "TG_GRPC[missl]"; take_port "TG_ADMIN[missl]"
  tg_config missl "${TG_GRPC[missl]}" "${TG_ADMIN[missl]}" local >/dev/null
  start_tokengate missl
  log "tokengate local miss :${TG_GRPC[missl]}"
fi

# ---- null ext_authz server ------------------------------------------------------------------
take_port NULL_PORT
spawn null-authz "$BIN/null-authz" --listen "127.0.0.1:$NULL_PORT" --workers "$NULL_WORKERS"
wait_for "null-authz ready" 10 ready_line null-authz
# The same, answering with seven identity headers like tokengate's allow: separates what Envoy
# spends applying the headers (the feature) from what tokengate spends producing them.
take_port NULL_HDRS_PORT
spawn null-authz-hdrs "$BIN/null-authz" --listen "127.0.0.1:$NULL_HDRS_PORT" --workers "$NULL_WORKERS" \
  --identity-headers --no-vectored
wait_for "null-authz-hdrs ready" 10 ready_line null-authz-hdrs

# ---- Envoys -----------------------------------------------------------------------------------
"$BIN/tokengate-bench" jwt --dir "$OUT/jwt"
JWT=$(cat "$OUT/jwt/jwt.txt")
JWKS=$(cat "$OUT/jwt/jwks.json")
declare -A LISTEN=() EADMIN=()
start_envoy() { # SCENARIO TEMPLATE [AUTHZ_PORT]
  local s=$1 tpl=$2 authz=${3:-0}
  take_port "LISTEN[$s]"; take_port "EADMIN[$s]"
  sed -e "s|@ADMIN_PORT@|${EADMIN[$s]}|; s|@LISTEN_PORT@|${LISTEN[$s]}|; s|@AUTHZ_PORT@|$authz|; s|@JWKS@|$JWKS|" \
    "$ROOT/bench/envoy/$tpl.yaml" > "$OUT/conf/envoy-$s.yaml"
  spawn "envoy-$s" "$ENVOY" -c "$OUT/conf/envoy-$s.yaml" --concurrency "$CONC" \
    --disable-hot-restart -l warn
}
start_envoy noauth noauth
start_envoy jwt_nocache jwt-nocache
start_envoy jwt_cache jwt-cache
start_envoy extauthz_null extauthz "$NULL_PORT"
start_envoy extauthz_null_hdrs extauthz "$NULL_HDRS_PORT"
if ((TG)); then
  start_envoy tokengate_hit extauthz "${TG_GRPC[hit]}"
  # The same tokengate process through Envoy's HTTP ext_authz (http_service), over HTTP/1.1
  # and over h2c: only the protocol between Envoy and tokengate differs.
  start_envoy tokengate_hit_http extauthz-http "${TG_HTTP[hit]}"
  start_envoy tokengate_hit_h2c extauthz-h2c "${TG_HTTP[hit]}"
  start_envoy tokengate_miss extauthz "${TG_GRPC[miss]}"
fi
((LOCAL)) && start_envoy tokengate_miss_local extauthz "${TG_GRPC[missl]}"
for s in "${!LISTEN[@]}"; do
  wait_for "envoy $s ready" 30 curl -sf "http://127.0.0.1:${EADMIN[$s]}/ready"
done

# ---- sanity: every scenario answers 200 with its credentials ---------------------------------
code() { curl -s -o /dev/null -w '%{http_code}' "${@:2}" "http://127.0.0.1:$1/"; }
[[ $(code "${LISTEN[noauth]}") == 200 ]] || die "noauth: not 200"
[[ $(code "${LISTEN[jwt_nocache]}") == 401 ]] || die "jwt_authn lets requests without a token through"
for s in jwt_nocache jwt_cache; do
  [[ $(code "${LISTEN[$s]}" -H "Authorization: Bearer $JWT") == 200 ]] || die "$s: JWT rejected"
done
if ((TG)); then
  for s in tokengate_hit tokengate_hit_http tokengate_hit_h2c; do
    [[ $(code "${LISTEN[$s]}" -H 'Authorization: Bearer nope') =~ ^40[13]$ ]] ||
      die "$s: tokengate lets a bad token through"
    [[ $(code "${LISTEN[$s]}") == 401 ]] || die "$s: no token is not 401"
    [[ $(code "${LISTEN[$s]}" -H "Authorization: Bearer $HIT_TOKEN") == 200 ]] ||
      die "$s: tokengate denies a valid token"
  done
fi
if ((LOCAL)); then
  [[ $(code "${LISTEN[tokengate_miss_local]}" -H 'Authorization: Bearer nope') =~ ^40[13]$ ]] ||
    die "tokengate (local) lets a bad token through"
  [[ $(code "${LISTEN[tokengate_miss_local]}" -H "Authorization: Bearer $HIT_TOKEN") == 200 ]] ||
    die "tokengate (local) denies a valid token"
fi
for s in extauthz_null extauthz_null_hdrs; do
  [[ $(code "${LISTEN[$s]}" -H "Authorization: Bearer $HIT_TOKEN") == 200 ]] || die "$s: not 200"
done
# What Envoy sends with our published config (allowed_headers: the token headers only).
"$BIN/tokengate-bench" check-body --tokens "$SDIR/single.txt" --line 0 --out "$OUT/conf/check.bin" \
  --token-header-only
# The same Check from the token's own workload over mTLS, on the require_peer route.
PEER=spiffe://cluster.local/ns/bench/sa/client
"$BIN/tokengate-bench" check-body --tokens "$SDIR/single.txt" --line 0 --out "$OUT/conf/check-peer.bin" \
  --token-header-only --peer "$PEER"
set_latency "$MISS_MS"
log "stand-in TokenReview latency +${MISS_MS} ms; pool $(wc -l < "$SDIR/pool.txt") tokens"

# ---- environment ------------------------------------------------------------------------------
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "nproc: $(nproc)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
  echo "kernel: $(uname -r)"
  echo "envoy: $("$ENVOY" --version 2>/dev/null | grep -o 'version: .*' | head -1)"
  echo "rustc: $(rustc --version)"
  echo "wrk: $(wrk -v 2>&1 | head -1)"
  echo "h2load: $(h2load --version 2>&1 | head -1)"
  echo "settings: rounds=$ROUNDS sat=${SAT}s lat=${LAT}s rate=$RATE lat_rounds=$LAT_ROUNDS conns=$CONNS envoy_concurrency=$CONC miss_latency=${MISS_MS}ms pool=$POOL alg=$ALG fill=$FILL null_workers=$NULL_WORKERS tokengate_workers=${BENCH_TG_WORKERS:-default}"
} > "$OUT/env.txt"

# ---- measurement helpers ----------------------------------------------------------------------
# CPU time (µs) used so far by a process, from /proc/PID/stat utime+stime.
TCK=$(getconf CLK_TCK)
cpu_us() { awk -v t="$TCK" '{print ($14 + $15) * 1000000 / t}' "/proc/$1/stat" 2>/dev/null || echo 0; }
authz_of() { # scenario -> process name of its authz server ("" if none)
  case $1 in
    extauthz_null|check_null) echo null-authz ;;
    extauthz_null_hdrs) echo null-authz-hdrs ;;
    tokengate_hit|tokengate_hit_http|tokengate_hit_h2c|check_tokengate|check_tokengate_peer) echo tokengate-hit ;;
    tokengate_miss) echo tokengate-miss ;;
    tokengate_miss_local) echo tokengate-missl ;;
    *) echo "" ;;
  esac
}
# restart_miss SCENARIO: a fresh (empty-cache) tokengate for a cache-miss scenario.
restart_miss() {
  local t=miss
  [[ $1 == tokengate_miss_local ]] && t=missl
  stop "tokengate-$t"; start_tokengate $t
}

# saturate SCENARIO ROUND: one closed-loop saturation run; appends to sat.tsv and cpu.tsv.
saturate() {
  local s=$1 r=$2 out rps bad authz e0 a0 e1 a1 n
  [[ $s == tokengate_miss* ]] && restart_miss "$s"
  authz=$(authz_of "$s")
  local envoy_pid=${PIDS[envoy-$s]:-} authz_pid=${authz:+${PIDS[$authz]}}
  e0=$([[ -n $envoy_pid ]] && cpu_us "$envoy_pid" || echo 0)
  a0=$([[ -n $authz_pid ]] && cpu_us "$authz_pid" || echo 0)
  # TokenReviews made during the run (read outside the CPU window).
  local rv0; rv0=$( ((TG)) && reviews || echo 0)
  local k0 k1; k0=$(cpu_us "${PIDS[standin]}")
  local profs=()
  if [[ $r == profile ]]; then
    [[ -n $authz_pid ]] && profs+=("$authz:$authz_pid")
    [[ -n $envoy_pid && -n $authz_pid ]] && profs+=("envoy:$envoy_pid")
  fi
  local prof perf_pids=()
  for prof in "${profs[@]}"; do
    # cpu-clock: VMs often expose no hardware PMU. DWARF unwinding: release builds keep line
    # tables but no frame pointers.
    perf record -q -e cpu-clock -F 499 --call-graph dwarf,16384 -p "${prof#*:}" \
      -o "$OUT/perf-$s-${prof%%:*}.data" -- sleep $((SAT > 2 ? SAT - 1 : 1)) >/dev/null 2>&1 &
    perf_pids+=($!)
  done
  local wrk=(wrk -t"$CONC" -c"$CONNS" -d"${SAT}s" --latency)
  case $s in
    noauth) out=$("${wrk[@]}" "http://127.0.0.1:${LISTEN[$s]}/") ;;
    jwt_*) out=$("${wrk[@]}" -H "Authorization: Bearer $JWT" "http://127.0.0.1:${LISTEN[$s]}/") ;;
    extauthz_null|extauthz_null_hdrs|tokengate_hit|tokengate_hit_http|tokengate_hit_h2c)
      out=$("${wrk[@]}" -H "Authorization: Bearer $HIT_TOKEN" "http://127.0.0.1:${LISTEN[$s]}/") ;;
    tokengate_miss|tokengate_miss_local)
      out=$("${wrk[@]}" -s "$ROOT/bench/pool.lua" "http://127.0.0.1:${LISTEN[$s]}/" -- "$SDIR/pool.txt" "$CONC") ;;
    check_null|check_tokengate|check_tokengate_peer)
      local p=$NULL_PORT body=$OUT/conf/check.bin
      [[ $s == check_tokengate* ]] && p=${TG_GRPC[hit]}
      [[ $s == check_tokengate_peer ]] && body=$OUT/conf/check-peer.bin
      out=$(h2load -D "$SAT" -c1 -m"$CONNS" -t1 -d "$body" \
        -H 'content-type: application/grpc' -H 'te: trailers' \
        "http://127.0.0.1:$p/envoy.service.auth.v3.Authorization/Check") ;;
  esac
  echo "$out" > "$OUT/logs/sat-$s-$r.txt"
  for prof in "${perf_pids[@]}"; do wait "$prof" || true; done
  for prof in "${profs[@]}"; do
    local data=$OUT/perf-$s-${prof%%:*}.data
    perf report -i "$data" --no-children --sort dso,symbol --stdio -g none 2>/dev/null |
      grep -E '^ +[0-9]' | sed 's/ *$//' | head -n 60 > "$OUT/profile-$s-${prof%%:*}-self.txt" || true
    perf report -i "$data" --children --sort symbol --stdio -g none 2>/dev/null |
      grep -E '^ +[0-9]' | sed 's/ *$//' | head -n 100 > "$OUT/profile-$s-${prof%%:*}-children.txt" || true
  done
  if [[ $s == check_* ]]; then
    rps=$(echo "$out" | sed -nE 's/^finished in [0-9.]+s, ([0-9.]+) req\/s.*/\1/p')
    n=$(echo "$out" | sed -nE 's/^requests: ([0-9]+) total.*/\1/p')
    bad=$(echo "$out" | sed -nE 's/^requests: .* ([0-9]+) failed, ([0-9]+) errored.*/\1 \2/p' | awk '{print $1 + $2}')
  else
    rps=$(echo "$out" | awk '/^Requests\/sec:/ {print $2}')
    n=$(echo "$out" | awk '/requests in/ {print $1}')
    bad=$(echo "$out" | awk '/Non-2xx/ {b += $NF} /Socket errors/ {gsub(",", ""); b += $4 + $6 + $8 + $10} END {print b + 0}')
    if [[ $s == tokengate_miss* ]] && grep -q '^pool_wrapped [1-9]' <<<"$out"; then
      log "WARNING: cache-miss run used more requests than the pool holds (raise BENCH_POOL)"
      echo "WARNING: round $r of $s reused tokens (pool too small): $(grep pool_wrapped <<<"$out")" >> "$OUT/extra.txt"
    fi

  fi
  e1=$([[ -n $envoy_pid ]] && cpu_us "$envoy_pid" || echo 0)
  a1=$([[ -n $authz_pid ]] && cpu_us "$authz_pid" || echo 0)
  k1=$(cpu_us "${PIDS[standin]}")
  if [[ $s == tokengate_miss_local && $r != 0 && $r != profile ]]; then
    echo "local cache miss, round $r: $(($(reviews) - rv0)) TokenReview call(s) for ${n:-0} requests" >> "$OUT/extra.txt"
  fi
  printf '%s\t%s\t%s\t%s\n' "$s" "$r" "${rps:-0}" "${bad:-0}" >> "$OUT/sat.tsv"
  awk -v s="$s" -v r="$r" -v n="${n:-0}" -v e="$((${e1%.*} - ${e0%.*}))" -v a="$((${a1%.*} - ${a0%.*}))" \
    -v k="$((${k1%.*} - ${k0%.*}))" \
    'BEGIN { if (n > 0) printf "%s\t%s\t%.1f\t%.1f\t%.1f\n", s, r, e / n, a / n, k / n }' >> "$OUT/cpu.tsv"
  log "$(printf '%-16s round %s: %8.0f rps  (%s bad)' "$s" "$r" "${rps:-0}" "${bad:-0}")"
}

# latency SCENARIO: one open-loop fixed-rate run; appends to lat.jsonl.
latency() {
  local s=$1 load=("$BIN/tokengate-bench" load --label "$1" --rate "$RATE" --duration "$LAT" --warmup 1)
  [[ $s == tokengate_miss* ]] && restart_miss "$s"
  echo "$JWT" > "$OUT/conf/jwt-token.txt"
  case $s in
    noauth) load+=(--http "127.0.0.1:${LISTEN[$s]}") ;;
    jwt_*) load+=(--http "127.0.0.1:${LISTEN[$s]}" --tokens "$OUT/conf/jwt-token.txt") ;;
    extauthz_null|extauthz_null_hdrs|tokengate_hit|tokengate_hit_http|tokengate_hit_h2c) load+=(--http "127.0.0.1:${LISTEN[$s]}" --tokens "$SDIR/single.txt" --first 1) ;;
    tokengate_miss|tokengate_miss_local) load+=(--http "127.0.0.1:${LISTEN[$s]}" --tokens "$SDIR/pool.txt") ;;
    check_null) load+=(--grpc "http://127.0.0.1:$NULL_PORT" --tokens "$SDIR/single.txt" --first 1) ;;
    check_tokengate) load+=(--grpc "http://127.0.0.1:${TG_GRPC[hit]}" --tokens "$SDIR/single.txt" --first 1) ;;
    check_tokengate_peer) load+=(--grpc "http://127.0.0.1:${TG_GRPC[hit]}" --tokens "$SDIR/single.txt" --first 1 --peer "$PEER") ;;
  esac
  local line; line=$("${load[@]}")
  echo "$line" >> "$OUT/lat.jsonl"
  log "$(printf '%-16s @%s rps: %s' "$s" "$RATE" "$(echo "$line" | sed -E 's/.*"p50_us":([0-9]+).*"p99_us":([0-9]+).*/p50 \1 µs, p99 \2 µs/')")"
}

# ---- the runs: saturation rounds, alternating scenarios, then fixed-rate latency ----------------
read -r -a SC <<<"$SCENARIOS"
log "warm-up"
for s in "${SC[@]}"; do [[ $s == tokengate_miss* ]] || SAT=1 saturate "$s" 0 >/dev/null 2>&1; done
sed -i '/\t0\t/d' "$OUT/sat.tsv" "$OUT/cpu.tsv"
for ((r = 1; r <= ROUNDS; r++)); do
  # Rotate the starting scenario each round so no scenario always follows the same neighbour.
  for ((i = 0; i < ${#SC[@]}; i++)); do
    saturate "${SC[$(((i + r - 1) % ${#SC[@]}))]}" "$r"
  done
done
# Latency rounds alternate too; the report takes the median p50/p99 over rounds.
for ((r = 1; r <= LAT_ROUNDS; r++)); do
  for s in "${SC[@]}"; do latency "$s"; done
done
if [[ ${BENCH_PROFILE:-0} == 1 ]]; then
  command -v perf >/dev/null || die "BENCH_PROFILE=1 needs perf (apt-get install -y linux-perf)"
  log "profiling (extra round, not recorded)"
  for s in "${SC[@]}"; do
    if [[ -n $(authz_of "$s") ]]; then saturate "$s" profile; fi
  done
  sed -i '/\tprofile\t/d' "$OUT/sat.tsv" "$OUT/cpu.tsv"
fi

# ---- single-flight: N concurrent Checks with one new token -> TokenReview calls ------------------
if ((TG)); then
set_latency 50
for line in 1 2 3; do
  before=$(reviews)
  res=$("$BIN/tokengate-bench" burst --grpc "http://127.0.0.1:${TG_GRPC[hit]}" --tokens "$SDIR/single.txt" --line "$line" --n 100)
  after=$(reviews)
  echo "single-flight: 100 concurrent Checks with one new token → $((after - before)) TokenReview call(s) ($res)" >> "$OUT/extra.txt"
done
set_latency 0

# ---- instructions per Check: plain hit vs. peer + RBAC hit, under callgrind ---------------------
# Wall-clock CPU per Check swings with whatever else the machine runs; instruction counts do
# not. A tokengate of the same build runs under callgrind; each window zeroes the counters,
# answers INSTR_N Checks of one kind (after a warm-up that caches the verdict and the RBAC
# answer) and dumps. Windows alternate, twice each.
if ((INSTR)); then
  log "instructions per Check under callgrind ($INSTR_N Checks per window)"
  take_port "TG_GRPC[cg]"; take_port "TG_ADMIN[cg]"
  tg_config cg "${TG_GRPC[cg]}" "${TG_ADMIN[cg]}" >/dev/null
  mkdir -p "$OUT/callgrind"
  spawn tokengate-cg valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind/out.%p" \
    "$TG_BIN" serve --config "$OUT/conf/tokengate-cg.yaml"
  wait_for "tokengate under callgrind ready" 300 curl -sf "http://127.0.0.1:${TG_ADMIN[cg]}/readyz"
  cg_checks() { # N BODY: N Checks, 8 concurrent streams on one connection; prints h2load's tally
    h2load -n "$1" -c1 -m8 -t1 -d "$2" -H 'content-type: application/grpc' -H 'te: trailers' \
      "http://127.0.0.1:${TG_GRPC[cg]}/envoy.service.auth.v3.Authorization/Check" | grep -E '^requests:'
  }
  declare -A IR=()
  for kind in check check-peer check check-peer; do
    cg_checks 500 "$OUT/conf/$kind.bin" >/dev/null
    callgrind_control -z "${PIDS[tokengate-cg]}" >/dev/null 2>&1
    tally=$(cg_checks "$INSTR_N" "$OUT/conf/$kind.bin")
    callgrind_control -d "$kind" "${PIDS[tokengate-cg]}" >/dev/null 2>&1
    dump=$(ls -t "$OUT"/callgrind/out.* | head -n 1)
    ir=$(awk '/^(summary|totals):/ {print $2; exit}' "$dump")
    IR[$kind]="${IR[$kind]:-} $((ir / INSTR_N))"
    echo "instructions: $kind $((ir / INSTR_N)) per Check ($ir in $INSTR_N Checks; $tally)" >> "$OUT/extra.txt"
  done
  cg_decisions=$(curl -sf "http://127.0.0.1:${TG_ADMIN[cg]}/metrics" | grep '^tokengate_decisions_total' | grep -v ' 0$' || true)
  grep -q 'outcome="deny"' <<<"$cg_decisions" && die "a Check under callgrind was denied: $cg_decisions"
  stop tokengate-cg
  awk -v a="${IR[check]}" -v b="${IR[check-peer]}" 'BEGIN {
    split(a, x, " "); split(b, y, " "); pa = (x[1] + x[2]) / 2; pb = (y[1] + y[2]) / 2
    printf "instructions per Check, peer + RBAC hit ÷ plain hit: %.3f× (%.0f vs %.0f, mean of two windows each)\n", pb / pa, pb, pa
  }' >> "$OUT/extra.txt"
fi

# ---- RSS with FILL cached identities ------------------------------------------------------------
take_port "TG_GRPC[rss]"; take_port "TG_ADMIN[rss]"
tg_config rss "${TG_GRPC[rss]}" "${TG_ADMIN[rss]}" >/dev/null
start_tokengate rss
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/${PIDS[tokengate-rss]}/status"; }
rss0=$(rss_kib)
log "filling a fresh tokengate with $FILL identities"
fill_res=$("$BIN/tokengate-bench" fill --grpc "http://127.0.0.1:${TG_GRPC[rss]}" --tokens "$SDIR/fill.txt" --concurrency 64)
rss1=$(rss_kib)
{
  echo "RSS of tokengate: $((rss0 / 1024)) MiB idle → $((rss1 / 1024)) MiB with $FILL cached identities ($(((rss1 - rss0) * 1024 / (FILL > 0 ? FILL : 1))) bytes per identity; fill: $fill_res)"
  curl -s "http://127.0.0.1:${TG_ADMIN[rss]}/metrics" | grep -iE '^tokengate_cache[a-z_]*(entries|size)' | sed 's/^/metrics: /' || true
} >> "$OUT/extra.txt"
fi

# ---- issue 9: revocation latency, TokenReviews after a restart, RSS of the watch caches ------------
# Each subcommand runs its own stand-in (in-process) and tokengate ($TG_BIN) as a process; the
# run.sh processes above stay idle meanwhile. JSON lines in issue9.jsonl, summaries in extra.txt.
if ((ISSUE9)); then
  log "issue 9: revocation ($REV_N deletions per mode), restart-reviews ($RR_N callers), watch-rss ($RSS_PODS pods)"
  i9=("--tokengate" "$TG_BIN")
  "$BIN/tokengate-bench" revocation --n "$REV_N" --dir "$OUT/issue9/revocation" "${i9[@]}" \
    >> "$OUT/issue9.jsonl" 2> >(tee -a "$OUT/logs/issue9.log" | grep '^revocation' >> "$OUT/extra.txt")
  "$BIN/tokengate-bench" restart-reviews --n "$RR_N" --dir "$OUT/issue9/restart" "${i9[@]}" \
    >> "$OUT/issue9.jsonl" 2> >(tee -a "$OUT/logs/issue9.log" | grep '^restart-reviews' >> "$OUT/extra.txt")
  "$BIN/tokengate-bench" watch-rss --pods "$RSS_PODS" --service-accounts "$RSS_SAS" --dir "$OUT/issue9/rss" "${i9[@]}" \
    >> "$OUT/issue9.jsonl" 2> >(tee -a "$OUT/logs/issue9.log" | grep '^watch-rss' >> "$OUT/extra.txt")
  sleep 0.2 # the process substitutions above finish writing extra.txt
fi

# check_tokengate_peer must have been allowed, not denied (h2load sees only HTTP statuses).
if [[ " ${SC[*]} " == *" check_tokengate_peer "* ]]; then
  peer_lines=$(curl -sf "http://127.0.0.1:${TG_ADMIN[hit]}/metrics" | grep 'route="bench-peer"' | grep -v ' 0$' || true)
  echo "require_peer route decisions: $(tr '\n' ' ' <<<"$peer_lines")" >> "$OUT/extra.txt"
  grep -q 'outcome="deny"' <<<"$peer_lines" && die "check_tokengate_peer was denied: $peer_lines"
  grep -q 'outcome="allow"' <<<"$peer_lines" || die "check_tokengate_peer: no allow counted"
fi
# ---- report -------------------------------------------------------------------------------------
"$BIN/tokengate-bench" report "$OUT" > "$OUT/summary.md"
{ echo; echo '```'; cat "$OUT/env.txt"; echo '```'; } >> "$OUT/summary.md"
cat "$OUT/summary.md"
log "results in $OUT"
