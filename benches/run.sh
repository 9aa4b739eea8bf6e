#!/usr/bin/env bash
# gopush benchmark harness: gopush vs nginx vs direct-to-backend, on loopback, in one command.
#
#   bash benches/run.sh            full run (~10 min), writes docs/BENCHMARKS.md + docs/benchmarks.svg
#   bash benches/run.sh --smoke    every scenario for a few seconds / small counts (CI); writes
#                                  its report to $TMPDIR/gopush-bench-smoke/ unless --out is given
#
# Options:
#   --rounds N        how many times each scenario alternates the targets (full 3, smoke 1)
#   --out DIR         where BENCHMARKS.md and benchmarks.svg go
#   --only a,b        run only these scenarios; --skip a,b skips them. Scenarios:
#                     http (Node /whoami), http-static (nginx `return 200` backends), polling,
#                     websocket, idle, storm, micro (criterion); over TLS (nginx and gopush
#                     on one ECDSA P-256 certificate, HTTP/2 offered by both): https (keep-alive
#                     GET to the static backends), handshake (a new TLS connection per request),
#                     wss (Socket.IO websocket echo), idle-wss (idle wss memory)
#   --keep            keep the work directory (configs, logs) even on success
#   GP_READ_BUFFER=N  gopush's server.read_buffer_bytes (default 0, gopush's own default)
#   GP_WORK_STEALING=true|false  gopush's server.work_stealing (default: gopush's own default)
#
# What it starts, all on 127.0.0.1 with free ports, all stopped on exit (trap):
#   redis-server (fresh, no persistence); 2 Node Socket.IO backends (tests/e2e/lib/backend.js,
#   @socket.io/redis-adapter); a static nginx answering `return 200` on 2 ports; nginx as the
#   proxy (`hash $cookie_uid consistent`, WebSocket headers); gopush with the equivalent config;
#   and bare Pingora (examples/bare_pingora.rs: cookie uid -> Ketama, nothing else), which shows
#   what Pingora itself costs and what gopush adds on top.
# Each scenario runs its targets in rotating order (direct, nginx, pingora, gopush; then nginx,
# pingora, gopush, direct; ...) so slow drift of a shared machine hits all of them alike;
# report.js takes the median over rounds.
#
# Exit status: 0 if every selected scenario ran without error, 1 otherwise (the report is still
# written, failed scenarios marked), 2 on a setup problem.
#
# Requirements: wrk, nginx (nginx-light), redis-server, node >= 20 with the e2e suite's packages
# (`(cd tests/e2e && npm ci)`), and cargo (the binaries are built: see PROFILE below).
# Environment: GOPUSH_BIN, BARE_BIN, NGINX_BIN, REDIS_SERVER_BIN, WRK_BIN, NODE_PATH override the
# tools; BENCH_PROFILE the cargo profile built (full: dist, smoke: release);
# BENCH_BACKEND_BACKLOG (4096; 0 = Node's 511), BENCH_BUDGET_S (watchdog: full 900, smoke 300).
# BARE_L4_READ (unset): bare Pingora's downstream read buffer in bytes, for experiments (default: Pingora's 64 KiB).
# BARE_WORK_STEALING (unset): `true` gives bare Pingora Pingora's work-stealing runtime (default: none, as gopush).

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH="$ROOT/benches"
NGINX_BIN=${NGINX_BIN:-/usr/sbin/nginx}
REDIS_BIN=${REDIS_SERVER_BIN:-redis-server}
# The Node load generator reuses the e2e suite's packages (socket.io-client, ws, ...).
export NODE_PATH=${NODE_PATH:-$ROOT/tests/e2e/node_modules}

# ------------------------------------------------------------------------------------------------
# options

MODE=full ROUNDS="" OUT="" ONLY="" SKIP="" KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) MODE=smoke ;;
    --rounds) ROUNDS=$2; shift ;;
    --out) OUT=$2; shift ;;
    --only) ONLY=$2; shift ;;
    --skip) SKIP=$2; shift ;;
    --keep) KEEP=1 ;;
    -h|--help) sed -n '2,40p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "run.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

# What is measured: a full run builds the `dist` profile (fat LTO, one codegen unit; what a
# production build uses, README "Deploying"), gopush and bare Pingora alike; a smoke run uses the
# release build the tests made. BENCH_PROFILE overrides; GOPUSH_BIN / BARE_BIN skip the build.
if [ "$MODE" = smoke ]; then PROFILE=${BENCH_PROFILE:-release}; else PROFILE=${BENCH_PROFILE:-dist}; fi
BUILD_GOPUSH=0 BUILD_BARE=0
[ -n "${GOPUSH_BIN:-}" ] || { GOPUSH_BIN=$ROOT/target/$PROFILE/gopush; BUILD_GOPUSH=1; }
[ -n "${BARE_BIN:-}" ] || { BARE_BIN=$ROOT/target/$PROFILE/examples/bare_pingora; BUILD_BARE=1; }

ALL_SCENARIOS="http http-static polling websocket idle storm micro https handshake wss idle-wss"
for s in ${ONLY//,/ } ${SKIP//,/ }; do
  case " $ALL_SCENARIOS " in *" $s "*) ;; *) echo "run.sh: unknown scenario '$s' ($ALL_SCENARIOS)" >&2; exit 2 ;; esac
done
selected() {
  if [ -n "$ONLY" ]; then case ",$ONLY," in *",$1,"*) ;; *) return 1 ;; esac; fi
  case ",$SKIP," in *",$1,"*) return 1 ;; esac
  return 0
}

# Sizes per mode. The full run stays under ~10 minutes on 2 cores (see docs/BENCHMARKS.md);
# the smoke run exercises every code path in about a minute.
if [ "$MODE" = smoke ]; then
  : "${ROUNDS:=1}"
  HTTP_SECS=2 HTTP_WARM=1 WRK_CONNS=16
  POLL_CLIENTS=20 POLL_ECHOES=5
  WS_CLIENTS=20 WS_SECS=2
  IDLE_TIERS="200 500"
  IDLE_WSS_TIERS="200"
  STORM_CLIENTS=200
  CRITERION_ARGS=(--warm-up-time 0.2 --measurement-time 0.5 --sample-size 10)
  BUDGET_S=300
  : "${OUT:=${TMPDIR:-/tmp}/gopush-bench-smoke}"
else
  : "${ROUNDS:=3}"
  HTTP_SECS=5 HTTP_WARM=1 WRK_CONNS=50
  POLL_CLIENTS=200 POLL_ECHOES=20
  WS_CLIENTS=200 WS_SECS=4
  IDLE_TIERS="5000 20000"
  IDLE_WSS_TIERS="5000"
  STORM_CLIENTS=2000
  CRITERION_ARGS=(--warm-up-time 1 --measurement-time 3)
  BUDGET_S=900
  : "${OUT:=$ROOT/docs}"
fi
BUDGET_S=${BENCH_BUDGET_S:-$BUDGET_S}   # override for testing the watchdog
case "$ROUNDS" in ''|*[!0-9]*|0) echo "run.sh: --rounds needs a positive integer" >&2; exit 2 ;; esac

# ------------------------------------------------------------------------------------------------
# logging, process bookkeeping, cleanup

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 2; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/gopush-bench.XXXXXX")
RESULTS="$WORK/results.jsonl"
: >"$RESULTS"
PIDS=()          # every long-running process we started, stopped in reverse order
WORKERS=()       # nginx workers: their master stops them; killed only if one outlived its master
WATCHDOG=""
SCEN_PID=""      # the running scenario's subshell (its load generator is its child)
FAILED=()        # scenarios that reported an error

cleanup() {
  local rc=$? i p alive
  set +e
  if [ -n "$WATCHDOG" ]; then   # the watchdog subshell and its `sleep`
    for p in $(children_of "$WATCHDOG"); do kill "$p" 2>/dev/null; done
    kill "$WATCHDOG" 2>/dev/null
  fi
  if [ -n "$SCEN_PID" ]; then   # interrupted mid-scenario: stop its load generator first
    for p in $(children_of "$SCEN_PID"); do kill -TERM "$p" 2>/dev/null; done
    kill -TERM "$SCEN_PID" 2>/dev/null
  fi
  # SIGTERM first so nginx and gopush close their sockets; SIGKILL whatever is left after ~5 s.
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do kill -TERM "${PIDS[i]}" 2>/dev/null; done
  for ((i = 0; i < 50; i++)); do
    alive=0
    for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null; done
  for p in "${WORKERS[@]}"; do   # only if that PID is still an nginx worker (not a reused PID)
    case "$(tr '\0' ' ' 2>/dev/null <"/proc/$p/cmdline")" in "nginx: worker"*) kill -KILL "$p" ;; esac
  done
  if [ "$KEEP" = 1 ] || [ "$rc" -ne 0 ]; then
    log "work directory (configs, logs, raw results) kept: $WORK"
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

# start NAME LOGFILE CMD...: runs CMD in the background, remembers its PID in LAST_PID.
start() {
  local name=$1 logfile=$2
  shift 2
  "$@" >"$logfile" 2>&1 &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
  log "started $name (pid $LAST_PID)"
}

# wait_log PID FILE REGEX SECONDS WHAT: bounded wait for a readiness line; fails if PID died.
wait_log() {
  local pid=$1 file=$2 re=$3 secs=$4 what=$5 i
  for ((i = 0; i < secs * 10; i++)); do
    grep -Eq "$re" "$file" 2>/dev/null && return 0
    kill -0 "$pid" 2>/dev/null || { tail -n 20 "$file" >&2; die "$what exited during start-up"; }
    sleep 0.1
  done
  tail -n 20 "$file" >&2
  die "$what not ready after ${secs}s"
}

# wait_port PID PORT SECONDS WHAT: bounded wait until 127.0.0.1:PORT accepts TCP.
wait_port() {
  local pid=$1 port=$2 secs=$3 what=$4 i
  for ((i = 0; i < secs * 10; i++)); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    kill -0 "$pid" 2>/dev/null || die "$what exited during start-up (see $WORK)"
    sleep 0.1
  done
  die "$what not listening on $port after ${secs}s"
}

# children_of PID: the PIDs whose parent is PID (an nginx master's workers, a scenario's load
# generator), read from /proc/*/stat: field 4 is the parent; the name (field 2) is cut off first
# because it may contain spaces.
children_of() {
  local parent=$1 f line rest
  for f in /proc/[0-9]*/stat; do
    read -r line 2>/dev/null <"$f" || continue
    rest=${line##*) }
    # shellcheck disable=SC2086 # split into fields on purpose
    set -- $rest
    [ "${2:-}" = "$parent" ] && echo "${f//[!0-9]/}"
  done
  return 0
}

LOAD() { node "$BENCH/load.js" "$@"; }

# ------------------------------------------------------------------------------------------------
# preflight

for tool in node wrk "$NGINX_BIN" "$REDIS_BIN" curl openssl; do
  command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found (Debian: apt-get install wrk nginx-light redis-server curl nodejs)"
done
if [ ! -d "$NODE_PATH/socket.io-client" ] || [ ! -d "$NODE_PATH/ws" ]; then
  die "Node packages missing under $NODE_PATH: run (cd tests/e2e && npm ci --no-audit --no-fund)"
fi
# cargo does nothing when the binaries are up to date (the first dist build takes minutes).
if [ "$BUILD_GOPUSH" = 1 ]; then
  log "building $GOPUSH_BIN (cargo build --profile $PROFILE --bin gopush)"
  (cd "$ROOT" && cargo build --profile "$PROFILE" --bin gopush) || die "build failed"
fi
if [ "$BUILD_BARE" = 1 ]; then
  log "building $BARE_BIN (cargo build --profile $PROFILE --example bare_pingora)"
  (cd "$ROOT" && cargo build --profile "$PROFILE" --example bare_pingora) || die "build failed"
fi
[ -x "$GOPUSH_BIN" ] || die "$GOPUSH_BIN is not an executable"
[ -x "$BARE_BIN" ] || die "$BARE_BIN is not an executable"

# Idle WebSockets need many descriptors: raise the soft limit to the hard one (inherited by
# everything started below). A proxy holds 2 descriptors per proxied connection (client side +
# backend side), gopush with `cluster` 3 (plus the duplicate of the backend socket that closing a
# tunnel on purpose shuts down, src/kick.rs), so a tier above (limit - 512) / 3 cannot run here and
# is lowered to what fits (for every target alike, so that the rows stay comparable).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)
[ "$NOFILE" = unlimited ] && NOFILE=1048576
FDS_PER_IDLE=3
MAX_IDLE=$(( (NOFILE - 512) / FDS_PER_IDLE ))
IDLE_ACTUAL=() IDLE_NOTE="" last_tier=0
for t in $IDLE_TIERS; do
  if [ "$t" -le "$MAX_IDLE" ]; then
    IDLE_ACTUAL+=("$t") last_tier=$t
  else
    fit=$(( MAX_IDLE / 1000 * 1000 ))
    IDLE_NOTE="$t idle connections need ~$((FDS_PER_IDLE * t + 512)) descriptors in one proxy process but ulimit -n is $NOFILE here (hard limit)"
    if [ "$fit" -gt "$last_tier" ]; then
      IDLE_ACTUAL+=("$fit") last_tier=$fit IDLE_NOTE="$IDLE_NOTE, so that tier was lowered to $fit"
    else
      IDLE_NOTE="$IDLE_NOTE, so that tier was skipped"
    fi
    log "note: $IDLE_NOTE"
  fi
done
IDLE_TIERS_CSV=$(IFS=,; echo "${IDLE_ACTUAL[*]}")

# criterion compiles before any server starts, so its build time is not in the run's budget and
# a compile error is reported as the `micro` scenario's failure, not as a broken setup.
MICRO_BUILD_OK=1
if selected micro; then
  log "building the criterion micro-benchmarks (cargo bench --no-run)"
  if ! (cd "$ROOT" && timeout 900 cargo bench --bench resolve_select --bench hook_cost --no-run) >"$WORK/micro-build.log" 2>&1; then
    MICRO_BUILD_OK=0
    tail -n 30 "$WORK/micro-build.log" >&2
    log "micro: build failed (is the [[bench]] entry and criterion dev-dependency in Cargo.toml?)"
  fi
fi

# Whole-run watchdog: nothing below may hold the machine longer than BUDGET_S (each step has its
# own bound too; this only catches a bug in those bounds).
( sleep "$BUDGET_S"; echo "[bench] watchdog: run exceeded ${BUDGET_S}s, stopping" >&2; kill -TERM $$ ) &
WATCHDOG=$!
RUN_START=$(date +%s)

# ------------------------------------------------------------------------------------------------
# servers

mapfile -t P < <(LOAD ports 12)
[ "${#P[@]}" -eq 12 ] || die "could not find free ports"
REDIS_PORT=${P[0]} B1_PORT=${P[1]} B2_PORT=${P[2]} S1_PORT=${P[3]} S2_PORT=${P[4]} NGX_PORT=${P[5]} GP_PORT=${P[6]}
BARE_PORT=${P[7]} NGX_TLS_PORT=${P[8]} GP_TLS_PORT=${P[9]} GPC_PORT=${P[10]} GPC_ADMIN_PORT=${P[11]}

# One test CA and one ECDSA P-256 leaf (localhost, 127.0.0.1) for both TLS proxies; the Node
# load generator trusts the CA (NODE_EXTRA_CA_CERTS), wrk does not verify.
TLS_DIR="$WORK/tls"
mkdir -p "$TLS_DIR"
(
  cd "$TLS_DIR"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj "/CN=gopush bench CA" -keyout ca.key -out ca.pem
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -subj "/CN=localhost" -keyout leaf.key -out leaf.csr
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >leaf.ext
  openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile leaf.ext -out leaf.pem
  cat leaf.pem ca.pem >chain.pem
) >"$WORK/tls-gen.log" 2>&1 || { cat "$WORK/tls-gen.log" >&2; die "could not make the test certificate"; }
export NODE_EXTRA_CA_CERTS="$TLS_DIR/ca.pem"
B1=127.0.0.1:$B1_PORT B2=127.0.0.1:$B2_PORT S1=127.0.0.1:$S1_PORT S2=127.0.0.1:$S2_PORT

start redis "$WORK/redis.log" "$REDIS_BIN" --port "$REDIS_PORT" --bind 127.0.0.1 --save '' \
  --appendonly no --dir "$WORK" --daemonize no
wait_log "$LAST_PID" "$WORK/redis.log" 'Ready to accept connections' 10 redis-server

# The e2e suite's backend, with a 4096 listen backlog (benches/backlog.js says why; set
# BENCH_BACKEND_BACKLOG=0 for Node's default 511).
export BENCH_BACKEND_BACKLOG=${BENCH_BACKEND_BACKLOG:-4096}
for port in "$B1_PORT" "$B2_PORT"; do
  start "backend:$port" "$WORK/backend-$port.log" \
    node -r "$BENCH/backlog.js" "$ROOT/tests/e2e/lib/backend.js" --port "$port" --redis "redis://127.0.0.1:$REDIS_PORT"
  wait_log "$LAST_PID" "$WORK/backend-$port.log" "^listening $port\$" 15 "backend $port"
done

# nginx needs its temp paths inside a prefix we own; as root it must be told to stay root
# (its default user `nobody` could not read the work directory).
nginx_common() {
  local d=$1
  mkdir -p "$d"/{client_body,proxy,fastcgi,uwsgi,scgi}
  cat <<EOF
$( [ "$(id -u)" = 0 ] && echo 'user root root;' )
pid $d/nginx.pid;
error_log $d/error.log warn;
EOF
}
nginx_temp_paths() {
  local d=$1
  cat <<EOF
  client_body_temp_path $d/client_body;
  proxy_temp_path $d/proxy;
  fastcgi_temp_path $d/fastcgi;
  uwsgi_temp_path $d/uwsgi;
  scgi_temp_path $d/scgi;
EOF
}

# The static backend pair: what a proxy costs without Node in the way (one nginx, two ports).
SD="$WORK/nginx-static"
{ nginx_common "$SD"; cat <<EOF
worker_processes 1;
events { worker_connections 4096; }
http {
  access_log off;
$(nginx_temp_paths "$SD")
  keepalive_requests 1000000;
  default_type text/plain;
  server {
    listen $S1 backlog=4096;
    listen $S2 backlog=4096;
    location / { return 200 "ok\n"; }
  }
}
EOF
} >"$SD.conf"
start nginx-static "$WORK/nginx-static.log" "$NGINX_BIN" -p "$SD" -c "$SD.conf" -e "$SD/error.log" -g 'daemon off;'
wait_port "$LAST_PID" "$S2_PORT" 10 "static nginx"
for w in $(children_of "$LAST_PID"); do WORKERS+=("$w"); done

# nginx as the proxy, configured like gopush (see docs/BENCHMARKS.md, "Fairness"):
# - worker_processes 2 = gopush server.threads 2;
# - `hash $cookie_uid consistent` over the same literal IP:port list = gopush's Ketama ring;
# - WebSocket: HTTP/1.1 upstream, Upgrade/Connection passed, long read timeout (gopush lifts its
#   timeout after the 101); Connection "" for plain requests so upstream keep-alive works;
# - upstream keep-alive 128 = gopush upstream_keepalive_pool_size 128, and no per-connection
#   request cap (nginx's default 1000 would make wrk reconnect; Pingora has none);
# - the uid and X-Forwarded-* headers gopush also sets; access log off on both;
# - listen backlog 4096 (Pingora asks for 65535, capped by net.core.somaxconn);
# - nginx's defaults otherwise, notably proxy_connect_timeout 60s and max_fails=1 fail_timeout=10s.
#   (Copying gopush's 1 s connect timeout instead makes nginx fail ~25% of a 2,000-client storm
#   with 502: the Node backends' listen backlog (511) drops SYNs, connects time out, and nginx's
#   passive check then marks both backends down for 10 s. gopush retries on the next backend.)
# `?product=static` selects the static pool, as gopush's product_param does.
ND="$WORK/nginx-proxy"
NGX_WC=$(( NOFILE > 65536 ? 65536 : NOFILE - 256 ))
{ nginx_common "$ND"; cat <<EOF
worker_processes 2;
worker_rlimit_nofile $NOFILE;
events { worker_connections $NGX_WC; }
http {
  access_log off;
$(nginx_temp_paths "$ND")
  keepalive_requests 1000000;
  keepalive_timeout 75s;
  map \$http_upgrade \$connection_upgrade { default upgrade; '' ''; }
  map \$arg_product \$pool { default node; static static; }
  upstream node {
    hash \$cookie_uid consistent;
    server $B1;
    server $B2;
    keepalive 128;
    keepalive_requests 1000000;
  }
  upstream static {
    hash \$cookie_uid consistent;
    server $S1;
    server $S2;
    keepalive 128;
    keepalive_requests 1000000;
  }
  server {
    listen 127.0.0.1:$NGX_PORT backlog=4096;
    location / {
      proxy_pass http://\$pool;
      proxy_http_version 1.1;
      proxy_set_header Host \$host;
      proxy_set_header Upgrade \$http_upgrade;
      proxy_set_header Connection \$connection_upgrade;
      proxy_set_header X-Gopush-Uid \$cookie_uid;
      proxy_set_header X-Real-IP \$remote_addr;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto \$scheme;
      proxy_read_timeout 3600s;
      proxy_send_timeout 3600s;
    }
  }
  # The TLS twin (https, handshake, wss, idle-wss): same location; TLS 1.2/1.3 and HTTP/2 by
  # ALPN, as gopush's TLS listener; nginx's defaults otherwise (no session cache, so a new
  # connection is a full handshake on both).
  server {
    listen 127.0.0.1:$NGX_TLS_PORT ssl http2 backlog=4096;
    ssl_certificate $TLS_DIR/chain.pem;
    ssl_certificate_key $TLS_DIR/leaf.key;
    ssl_protocols TLSv1.2 TLSv1.3;
    location / {
      proxy_pass http://\$pool;
      proxy_http_version 1.1;
      proxy_set_header Host \$host;
      proxy_set_header Upgrade \$http_upgrade;
      proxy_set_header Connection \$connection_upgrade;
      proxy_set_header X-Gopush-Uid \$cookie_uid;
      proxy_set_header X-Real-IP \$remote_addr;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto \$scheme;
      proxy_read_timeout 3600s;
      proxy_send_timeout 3600s;
    }
  }
}
EOF
} >"$ND.conf"
"$NGINX_BIN" -t -p "$ND" -c "$ND.conf" -e "$ND/error.log" >"$WORK/nginx-proxy-t.log" 2>&1 \
  || { cat "$WORK/nginx-proxy-t.log" >&2; die "nginx proxy config rejected"; }
start nginx-proxy "$WORK/nginx-proxy.log" "$NGINX_BIN" -p "$ND" -c "$ND.conf" -e "$ND/error.log" -g 'daemon off;'
NGX_MASTER=$LAST_PID
wait_port "$NGX_MASTER" "$NGX_PORT" 10 "nginx proxy"
NGX_PIDS=$NGX_MASTER
for i in $(seq 1 50); do   # workers appear right after the master binds; bounded wait for both
  W=$(children_of "$NGX_MASTER" | tr '\n' ' ')
  [ "$(wc -w <<<"$W")" -ge 2 ] && break
  sleep 0.1
done
for w in $W; do WORKERS+=("$w"); NGX_PIDS="$NGX_PIDS,$w"; done
[ "$(wc -w <<<"$W")" -eq 2 ] || die "nginx proxy: expected 2 workers, found '$W'"

# gopush, equivalent: cookie uid only (what nginx hashes), same backends, 2 threads, no access log.
GP_CONF="$WORK/gopush.yaml"
cat >"$GP_CONF" <<EOF
listen:
  - "127.0.0.1:$GP_PORT"
  - addr: "127.0.0.1:$GP_TLS_PORT"
    tls: { certificates: [{ cert: $TLS_DIR/chain.pem, key: $TLS_DIR/leaf.key }] }
uid:
  sources: [{ cookie: uid }]
  forward: { header: x-gopush-uid, query: uid }
product_param: product
pools:
  default: { backends: ["$B1", "$B2"] }
  static: { backends: ["$S1", "$S2"] }
health_check: { kind: tcp, interval: 1s, timeout: 1s }
upstream: { connect_timeout: 1s }
affinity: { enabled: true, max_sessions: 100000, ttl: 24h }
access_log: { enabled: false }
server:
  threads: 2
  upstream_keepalive_pool_size: 128
  pid_file: $WORK/gopush.pid
  upgrade_sock: $WORK/gopush_upgrade.sock
  grace_period_seconds: 1
  graceful_shutdown_timeout_seconds: 1
  read_buffer_bytes: ${GP_READ_BUFFER:-0}
${GP_WORK_STEALING:+  work_stealing: $GP_WORK_STEALING}
EOF
"$GOPUSH_BIN" check -c "$GP_CONF" >"$WORK/gopush-check.log" 2>&1 \
  || { cat "$WORK/gopush-check.log" >&2; die "gopush rejected its config"; }
start gopush "$WORK/gopush.log" env RUST_LOG=warn "$GOPUSH_BIN" run -c "$GP_CONF"
GP_PID=$LAST_PID
wait_port "$GP_PID" "$GP_PORT" 15 gopush

# gopush with the cluster features on (`cluster:` on the same Redis: connection directory,
# presence, shared sid memory): the storm and idle scenarios run it beside plain gopush, as
# target `gopush-cluster`, to show what the directory costs.
GPC_CONF="$WORK/gopush-cluster.yaml"
sed -e "/^listen:/,/^uid:/{/^uid:/!d}" -e "s#^uid:#listen: \"127.0.0.1:$GPC_PORT\"\nuid:#" \
  -e "s#$WORK/gopush.pid#$WORK/gopush-cluster.pid#; s#$WORK/gopush_upgrade.sock#$WORK/gopush-cluster_upgrade.sock#" \
  "$GP_CONF" >"$GPC_CONF"
printf 'cluster: { redis: "redis://127.0.0.1:%s", agent_id: bench }\n' "$REDIS_PORT" >>"$GPC_CONF"
# Its own admin port: with the first gopush's 127.0.0.1:6004 taken, Pingora's admin service gave up
# binding after 30 s and panicked mid-run, and symbolising that backtrace added ~170 MB to the
# process's RSS, which the idle scenario then counted as connection memory.
printf 'admin: { listen: "127.0.0.1:%s" }\n' "$GPC_ADMIN_PORT" >>"$GPC_CONF"
"$GOPUSH_BIN" check -c "$GPC_CONF" >"$WORK/gopush-cluster-check.log" 2>&1 \
  || { cat "$WORK/gopush-cluster-check.log" >&2; die "gopush rejected its cluster config"; }
start gopush-cluster "$WORK/gopush-cluster.log" env RUST_LOG=warn "$GOPUSH_BIN" run -c "$GPC_CONF"
GPC_PID=$LAST_PID
wait_port "$GPC_PID" "$GPC_PORT" 15 "gopush (cluster)"

# Bare Pingora: the same pools, threads and runtime (no work stealing), Pingora's defaults for everything else.
start pingora "$WORK/pingora.log" env BARE_THREADS=2 ${BARE_L4_READ:+BARE_L4_READ=$BARE_L4_READ} ${BARE_WORK_STEALING:+BARE_WORK_STEALING=$BARE_WORK_STEALING} "$BARE_BIN" "127.0.0.1:$BARE_PORT" "$B1,$B2" "$S1,$S2"
BARE_PID=$LAST_PID
wait_port "$BARE_PID" "$BARE_PORT" 15 "bare pingora"

NGX_URL=http://127.0.0.1:$NGX_PORT GP_URL=http://127.0.0.1:$GP_PORT BARE_URL=http://127.0.0.1:$BARE_PORT
GPC_URL=http://127.0.0.1:$GPC_PORT
NGX_TLS_URL=https://localhost:$NGX_TLS_PORT GP_TLS_URL=https://localhost:$GP_TLS_PORT
wait_port "$GP_PID" "$GP_TLS_PORT" 15 "gopush (TLS)"
for u in "$NGX_TLS_URL" "$GP_TLS_URL"; do
  code=$(curl -s --cacert "$TLS_DIR/ca.pem" -o /dev/null -w '%{http_code}' -H 'Cookie: uid=u123' "$u/whoami?product=static")
  [ "$code" = 200 ] || die "$u/whoami?product=static answered $code over TLS"
done
# The HTTP scenarios use one uid so that direct, nginx and gopush all hit the same single backend
# (the one the ring gives `u123`): the proxies' cost is then what separates them from direct.
# (Whole output captured, first line kept: `gopush route | head -n 1` can make gopush panic on EPIPE.)
B_U123=$("$GOPUSH_BIN" route u123 -c "$GP_CONF") B_U123=${B_U123%%$'\n'*}
S_U123=$("$GOPUSH_BIN" route u123 --product static -c "$GP_CONF") S_U123=${S_U123%%$'\n'*}
case "$B_U123 $S_U123" in *127.0.0.1:*' '127.0.0.1:*) ;; *) die "gopush route gave '$B_U123' / '$S_U123'" ;; esac

log "checking that nginx and gopush place uids alike (and as the Ketama model says)"
LOAD parity --urls "$NGX_URL,$GP_URL,$BARE_URL" --direct "$B1,$B2" --uids 40 --record "$RESULTS" --scenario parity \
  || die "nginx and gopush disagree on placement: the comparison would be meaningless"
for u in "$NGX_URL" "$GP_URL" "$BARE_URL"; do
  code=$(curl -s -o /dev/null -w '%{http_code}' -H 'Cookie: uid=u123' "$u/whoami?product=static")
  [ "$code" = 200 ] || die "$u/whoami?product=static answered $code"
done

# ------------------------------------------------------------------------------------------------
# scenarios

# Rotating order of the targets per round (drift on a shared machine hits everyone alike).
order() {
  case $(( ($1 - 1) % 4 )) in
    0) echo direct nginx pingora gopush ;;
    1) echo nginx pingora gopush direct ;;
    2) echo pingora gopush direct nginx ;;
    3) echo gopush direct nginx pingora ;;
  esac
}
pids_of() { case $1 in nginx) echo "$NGX_PIDS" ;; gopush) echo "$GP_PID" ;; gopush-cluster) echo "$GPC_PID" ;; pingora) echo "$BARE_PID" ;; *) echo "" ;; esac; }
url_of() { case $1 in nginx) echo "$NGX_URL" ;; gopush) echo "$GP_URL" ;; gopush-cluster) echo "$GPC_URL" ;; pingora) echo "$BARE_URL" ;; esac; }
# The order with gopush-cluster right after gopush (storm and idle).
order_cluster() { order "$1" | sed 's/\bgopush\b/gopush gopush-cluster/'; }
# Socket.IO targets: a proxy URL, or the direct baseline (clients pick their backend by the ring).
# Both helpers fill an array (TGT, REC) so the options keep their word boundaries.
sio_target() { case $1 in direct) TGT=(--direct "$B1,$B2") ;; *) TGT=(--url "$(url_of "$1")") ;; esac; }
rec() { REC=(--record "$RESULTS" --scenario "$1" --target "$2" --round "$3"); }
# reference TARGET: errors of bare Pingora are recorded (and shown in the report) but do not fail
# the scenario: it is the yardstick, without gopush's fixes (it loses WebSocket handshakes to the
# pingora#946 race that src/upgrade.rs works around).
reference() {
  [ "$1" = pingora ] || return 1
  log "bare pingora saw errors (recorded; a reference, not gopush)"
}

sc_http() {
  local rc=0 r t url
  for r in $(seq 1 "$ROUNDS"); do for t in $(order "$r"); do
    case $t in direct) url=http://$B_U123/whoami ;; *) url=$(url_of "$t")/whoami ;; esac
    log "http (Node /whoami) round $r: $t"
    rec http "$t" "$r"
    LOAD http --url "$url" --pids "$(pids_of "$t")" --secs "$HTTP_SECS" --warm "$HTTP_WARM" \
      --conns "$WRK_CONNS" --uid u123 --timeout-ms $(( (HTTP_SECS + HTTP_WARM) * 1000 + 30000 )) \
      "${REC[@]}" || reference "$t" || rc=1
  done; done
  return $rc
}

sc_http_static() {
  local rc=0 r t url
  for r in $(seq 1 "$ROUNDS"); do for t in $(order "$r"); do
    case $t in direct) url="http://$S_U123/whoami?product=static" ;; *) url="$(url_of "$t")/whoami?product=static" ;; esac
    log "http (static backend) round $r: $t"
    rec http-static "$t" "$r"
    LOAD http --url "$url" --pids "$(pids_of "$t")" --secs "$HTTP_SECS" --warm "$HTTP_WARM" \
      --conns "$WRK_CONNS" --uid u123 --timeout-ms $(( (HTTP_SECS + HTTP_WARM) * 1000 + 30000 )) \
      "${REC[@]}" || reference "$t" || rc=1
  done; done
  return $rc
}

sc_polling() {
  local rc=0 r t
  for r in $(seq 1 "$ROUNDS"); do for t in $(order "$r"); do
    log "socket.io polling round $r: $t ($POLL_CLIENTS clients x $POLL_ECHOES echoes)"
    sio_target "$t"; rec polling "$t" "$r"
    LOAD polling "${TGT[@]}" --pids "$(pids_of "$t")" --clients "$POLL_CLIENTS" \
      --echoes "$POLL_ECHOES" --timeout-ms 90000 "${REC[@]}" || reference "$t" || rc=1
  done; done
  return $rc
}

sc_websocket() {
  local rc=0 r t
  for r in $(seq 1 "$ROUNDS"); do for t in $(order "$r"); do
    log "socket.io websocket round $r: $t ($WS_CLIENTS clients, ${WS_SECS}s)"
    sio_target "$t"; rec websocket "$t" "$r"
    LOAD websocket "${TGT[@]}" --pids "$(pids_of "$t")" --clients "$WS_CLIENTS" \
      --secs "$WS_SECS" --timeout-ms $(( WS_SECS * 1000 + 60000 )) "${REC[@]}" || reference "$t" || rc=1
  done; done
  return $rc
}

# Idle connections cost the proxy memory only; there is no proxy in the direct case. One round:
# the tiers already take most of a minute per proxy.
sc_idle() {
  local rc=0 t
  [ -n "$IDLE_TIERS_CSV" ] || { log "idle: no tier fits in ulimit -n $NOFILE"; return 1; }
  for t in nginx pingora gopush gopush-cluster; do
    log "idle websockets: $t (tiers $IDLE_TIERS_CSV)"
    rec idle "$t" 1
    local redis=()
    [ "$t" = gopush-cluster ] && redis=(--redis-port "$REDIS_PORT")
    LOAD idle --url "$(url_of "$t")" --pids "$(pids_of "$t")" --tiers "$IDLE_TIERS_CSV" \
      --timeout-ms 240000 "${redis[@]}" "${REC[@]}" || reference "$t" || rc=1
    sleep 2   # let the closes drain before the other proxy's "before" reading
  done
  return $rc
}

sc_storm() {
  local rc=0 r t
  for r in $(seq 1 "$ROUNDS"); do for t in $(order_cluster "$r"); do
    log "connect storm round $r: $t ($STORM_CLIENTS clients at once)"
    sio_target "$t"; rec storm "$t" "$r"
    LOAD storm "${TGT[@]}" --pids "$(pids_of "$t")" --clients "$STORM_CLIENTS" \
      --client-timeout-ms 30000 --timeout-ms 90000 "${REC[@]}" || reference "$t" || rc=1
    sleep 1
  done; done
  return $rc
}

# TLS scenarios: nginx and gopush only (the bare Pingora example has no TLS listener),
# alternating order.
tls_order() { if [ $(( $1 % 2 )) = 1 ]; then echo nginx gopush; else echo gopush nginx; fi; }
tls_url_of() { case $1 in nginx) echo "$NGX_TLS_URL" ;; gopush) echo "$GP_TLS_URL" ;; esac; }

# tls_http SCENARIO WHAT [LOAD OPTION...]: wrk against each proxy's TLS listener (static backend).
tls_http() {
  local scenario=$1 what=$2 rc=0 r t
  shift 2
  for r in $(seq 1 "$ROUNDS"); do for t in $(tls_order "$r"); do
    log "$what round $r: $t"
    rec "$scenario" "$t" "$r"
    LOAD http "$@" --url "$(tls_url_of "$t")/whoami?product=static" --pids "$(pids_of "$t")" --secs "$HTTP_SECS" \
      --warm "$HTTP_WARM" --conns "$WRK_CONNS" --uid u123 --timeout-ms $(( (HTTP_SECS + HTTP_WARM) * 1000 + 30000 )) \
      "${REC[@]}" || rc=1
  done; done
  return $rc
}

sc_https() { tls_http https "https keep-alive (static backend)"; }

# A new TLS connection per request (`Connection: close`): requests per second are full
# handshakes per second (ECDSA P-256; wrk resumes no session).
sc_handshake() { tls_http handshake "TLS handshakes (a new connection per request)" --close 1; }

sc_wss() {
  local rc=0 r t
  for r in $(seq 1 "$ROUNDS"); do for t in $(tls_order "$r"); do
    log "socket.io over wss round $r: $t ($WS_CLIENTS clients, ${WS_SECS}s)"
    rec wss "$t" "$r"
    LOAD websocket --url "$(tls_url_of "$t")" --pids "$(pids_of "$t")" --clients "$WS_CLIENTS" \
      --secs "$WS_SECS" --timeout-ms $(( WS_SECS * 1000 + 60000 )) "${REC[@]}" || rc=1
  done; done
  return $rc
}

sc_idle_wss() {
  local rc=0 t url pids
  # gopush is measured in a fresh process of the same configuration (its own ports): the one that
  # ran the earlier scenarios keeps the hundreds of MB glibc freed after idle's tunnels, which new
  # connections reuse unseen by an RSS reading (36 kB per idle wss connection measured that way).
  # nginx gives its memory back: its "before" reading is where it started.
  local fp p1 p2 p3
  mapfile -t fp < <(LOAD ports 3)
  p1=${fp[0]} p2=${fp[1]} p3=${fp[2]}
  sed -e "s#127.0.0.1:$GP_PORT\"#127.0.0.1:$p1\"#; s#127.0.0.1:$GP_TLS_PORT\"#127.0.0.1:$p2\"#" \
    -e "s#$WORK/gopush.pid#$WORK/gopush-fresh.pid#; s#$WORK/gopush_upgrade.sock#$WORK/gopush-fresh_upgrade.sock#" \
    "$GP_CONF" >"$WORK/gopush-fresh.yaml"
  printf 'admin: { listen: "127.0.0.1:%s" }\n' "$p3" >>"$WORK/gopush-fresh.yaml"
  start gopush-fresh "$WORK/gopush-fresh.log" env RUST_LOG=warn "$GOPUSH_BIN" run -c "$WORK/gopush-fresh.yaml"
  FRESH_PID=$LAST_PID   # (global: the trap runs after this function returned)
  trap 'kill -TERM "$FRESH_PID" 2>/dev/null || true' EXIT
  wait_port "$FRESH_PID" "$p2" 15 "gopush (fresh, TLS)"
  for t in nginx gopush; do
    url=$(tls_url_of "$t") pids=$(pids_of "$t")
    [ "$t" = gopush ] && url=https://localhost:$p2 pids=$FRESH_PID
    log "idle wss: $t (tiers $IDLE_WSS_TIERS)"
    rec idle-wss "$t" 1
    LOAD idle --url "$url" --pids "$pids" --tiers "${IDLE_WSS_TIERS// /,}" \
      --timeout-ms 240000 "${REC[@]}" || rc=1
    sleep 2   # let the closes drain before the other proxy's "before" reading
  done
  return $rc
}

sc_micro() {
  [ "$MICRO_BUILD_OK" = 1 ] || return 1
  log "criterion: uid resolution + ring selection; what a JavaScript uid hook costs"
  (cd "$ROOT" && CRITERION_HOME="$WORK/criterion" timeout 300 \
    cargo bench --bench resolve_select --bench hook_cost -- "${CRITERION_ARGS[@]}") >"$WORK/micro.log" 2>&1 \
    || { tail -n 30 "$WORK/micro.log" >&2; return 1; }
  grep -B1 'time:' "$WORK/micro.log" | grep -v -e '^--$' -e '^Benchmarking' >&2 || true
  rec micro gopush 1
  LOAD criterion --dir "$WORK/criterion" "${REC[@]}"
}

# run_scenario NAME FUNC: runs FUNC in a subshell with errexit really in force (it is not, for a
# function called in an `if`/`||` context), records a failure instead of stopping the whole run.
run_scenario() {
  local name=$1 fn=$2 t0
  selected "$name" || return 0
  t0=$(date +%s)
  ( set -e; "$fn" ) &
  SCEN_PID=$!
  if wait "$SCEN_PID"; then
    log "scenario $name: ok ($(( $(date +%s) - t0 ))s)"
  else
    log "scenario $name: FAILED ($(( $(date +%s) - t0 ))s)"
    FAILED+=("$name")
  fi
  SCEN_PID=""
  # A proxy that died makes every later number meaningless: stop here.
  for p in "$GP_PID" "$GPC_PID" "$BARE_PID" ${NGX_PIDS//,/ }; do
    kill -0 "$p" 2>/dev/null || die "proxy process $p died during '$name' (logs in $WORK)"
  done
}

# idle first, while every proxy process is fresh: after the others, a process's RSS holds memory
# freed by their connections, which idle's connections then reuse unseen, by an amount that
# depends on each process's history (plain gopush ran four more scenarios than gopush-cluster,
# which read as +3 kB per connection for the cluster features; fresh, +0.7 kB).
run_scenario idle sc_idle
run_scenario http sc_http
run_scenario http-static sc_http_static
run_scenario polling sc_polling
run_scenario websocket sc_websocket
run_scenario storm sc_storm
run_scenario micro sc_micro
run_scenario https sc_https
run_scenario handshake sc_handshake
run_scenario wss sc_wss
run_scenario idle-wss sc_idle_wss

# ------------------------------------------------------------------------------------------------
# report

ELAPSED=$(( $(date +%s) - RUN_START ))
mkdir -p "$OUT"
node "$BENCH/report.js" --results "$RESULTS" --out "$OUT" --mode "$MODE" --rounds "$ROUNDS" \
  --elapsed "$ELAPSED" --failed "$(IFS=,; echo "${FAILED[*]:-}")" --idle-note "$IDLE_NOTE" \
  --config "build: $PROFILE profile; http: wrk -t1 -c$WRK_CONNS ${HTTP_SECS}s (+${HTTP_WARM}s warm-up); polling: $POLL_CLIENTS clients x $POLL_ECHOES echoes; websocket: $WS_CLIENTS clients x ${WS_SECS}s; idle: $IDLE_TIERS_CSV; storm: $STORM_CLIENTS; TLS: ECDSA P-256 leaf, idle wss: ${IDLE_WSS_TIERS// /,}" \
  --gopush-version "$("$GOPUSH_BIN" --version 2>/dev/null | head -n 1)" \
  --commit "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet HEAD -- src 2>/dev/null || echo '+dirty')" \
  || { log "report generation failed"; exit 1; }
log "report: $OUT/BENCHMARKS.md, $OUT/benchmarks.svg (run took ${ELAPSED}s)"
[ "$MODE" = smoke ] && sed -n '/^## Results/,/^## Chart/p' "$OUT/BENCHMARKS.md" >&2

if [ ${#FAILED[@]} -gt 0 ]; then
  log "FAILED scenarios: ${FAILED[*]}"
  exit 1
fi
log "all scenarios passed"
