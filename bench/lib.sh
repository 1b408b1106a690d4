# bench/lib.sh - shell helpers shared by bench/snapshots.sh and bench/store-ops.sh.
#
# Sourced, not run:  . "$ROOT/bench/lib.sh"   (after `set -euo pipefail` and ROOT=).
# The sourcing script sets BENCH_NAME (prefix of its messages) first.
#
# Provides:
#   die MSG / log MSG           message on stderr (die exits 2)
#   need_tools T...             refuse clearly (exit 2) when a tool is missing
#   need_fio_nbd                refuse when fio has no nbd ioengine
#   need_uint VAR...            refuse when $VAR is not a whole number
#   resolve_strata              STRATA= the binary: $STRATA_BIN, or cargo build
#   make_scratch                SCRATCH= a new dir under $BENCH_DIR (default
#                               <repo>/target/bench); removed on exit unless the
#                               script failed or KEEP_SCRATCH=1; every pid in PIDS is
#                               stopped on exit (SIGTERM, then SIGKILL after 5 s),
#                               then bench_teardown runs if the script defines it
#   free_ports N                N distinct free loopback TCP ports, one per line
#   start_strata DATA_DIR LOG   starts `strata up`; sets PID_STRATA API NBD_URI_BASE;
#                               waits until NBD and HTTP answer
#   wait_up PID API LOG NAME    waits (30 s) until the process's HTTP API answers
#   stop_strata [SECS]          SIGTERM, waits (120 s, then SIGKILL) for the exit;
#                               fails unless it exits 0
#   scli ARGS...                strata --api $API ARGS...
#   node_field NAME             a field of GET /v1/node
#   wait_nbd URI                wait (20 s) until the export answers
#   json_get FILE EXPR          python expression over the JSON in FILE (as `d`)
#
# Environment read here: STRATA_BIN, BENCH_DIR, KEEP_SCRATCH (see the scripts' headers).
# shellcheck shell=bash

die() { echo "${BENCH_NAME:-bench}: $*" >&2; exit 2; }
log() { echo "${BENCH_NAME:-bench}: $*" >&2; }

need_tools() {
  local t missing=()
  for t in "$@"; do command -v "$t" >/dev/null || missing+=("$t"); done
  [ -n "${STRATA_BIN:-}" ] || command -v cargo >/dev/null || missing+=(cargo)
  if [ ${#missing[@]} -gt 0 ]; then
    die "missing tool(s): ${missing[*]}  (Debian: apt-get install fio libnbd-bin python3 curl; cargo unless STRATA_BIN= is given)"
  fi
}
need_fio_nbd() {
  fio --enghelp 2>/dev/null | grep -qw nbd || die "this fio has no nbd ioengine (need fio >= 3.26 built with libnbd)"
}
need_uint() {
  local v
  for v in "$@"; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a whole number, got '${!v}'"
  done
}

resolve_strata() {
  if [ -n "${STRATA_BIN:-}" ]; then
    [ -x "$STRATA_BIN" ] || die "STRATA_BIN=$STRATA_BIN is not an executable file"
    STRATA=$(cd "$(dirname "$STRATA_BIN")" && pwd)/$(basename "$STRATA_BIN")
  else
    log "building: cargo build --release -p strata-server (in $ROOT)"
    (cd "$ROOT" && cargo build --release -p strata-server) || die "cargo build failed"
    local tdir=${CARGO_TARGET_DIR:-target}
    case $tdir in /*) ;; *) tdir=$ROOT/$tdir ;; esac
    STRATA=$tdir/release/strata
    [ -x "$STRATA" ] || die "build finished but $STRATA is missing"
  fi
}

PIDS=()
_bench_cleanup() {
  local rc=$? p
  trap - EXIT INT TERM
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  # a script's own teardown (unmount, detach a loop device), after its processes are gone
  if declare -F bench_teardown >/dev/null; then bench_teardown || true; fi
  if [ -n "${SCRATCH:-}" ] && [ -d "$SCRATCH" ]; then
    if [ "$rc" -ne 0 ] || [ "${KEEP_SCRATCH:-0}" = 1 ]; then
      # keep the logs for diagnosis; drop the data dir unless KEEP_SCRATCH=1
      [ "${KEEP_SCRATCH:-0}" = 1 ] || rm -rf "$SCRATCH/strata-data"
      log "logs kept in $SCRATCH"
    else
      rm -rf "$SCRATCH"
    fi
  fi
  exit "$rc"
}
make_scratch() {
  BENCH_DIR=${BENCH_DIR:-$ROOT/target/bench}
  mkdir -p "$BENCH_DIR"
  SCRATCH=$(mktemp -d "$BENCH_DIR/${BENCH_NAME:-bench}.XXXXXX")
  trap _bench_cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
}

free_ports() {
  python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
for s in socks: print(s.getsockname()[1])
for s in socks: s.close()
PY
}

scli() { "$STRATA" --api "$API" "$@"; }
node_field() { curl -fsS "$API/v1/node" | python3 -c "import json,sys; print(json.load(sys.stdin)[sys.argv[1]])" "$1"; }
json_get() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))" "$1" "$2"; }

wait_nbd() {
  local i
  for i in $(seq 100); do
    kill -0 "$PID_STRATA" 2>/dev/null || { log "strata exited; its log:"; tail -20 "$STRATA_LOG" >&2; exit 3; }
    nbdinfo --size "$1" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  log "strata did not serve $1 within 20 s"; tail -20 "$STRATA_LOG" >&2; exit 3
}

start_strata() { # DATA_DIR LOG
  local ports
  mapfile -t ports < <(free_ports 3)
  STRATA_LOG=$2
  "$STRATA" up --data-dir "$1" --nbd "127.0.0.1:${ports[0]}" --http "127.0.0.1:${ports[1]}" \
    --rpc "127.0.0.1:${ports[2]}" >>"$STRATA_LOG" 2>&1 &
  PID_STRATA=$!; PIDS+=("$PID_STRATA")
  API=http://127.0.0.1:${ports[1]}
  NBD_URI_BASE=nbd://127.0.0.1:${ports[0]}
  wait_up "$PID_STRATA" "$API" "$STRATA_LOG" strata
}

wait_up() { # PID API LOG NAME: wait (30 s) until the process's API answers; exit 3 if not
  local i
  for i in $(seq 300); do
    kill -0 "$1" 2>/dev/null || { log "$4 exited during startup; its log ($3):"; tail -20 "$3" >&2; exit 3; }
    curl -fsS "$2/v1/node" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  log "$4 did not come up in 30 s; its log ($3):"; tail -20 "$3" >&2; exit 3
}

stop_strata() { # [TIMEOUT_S, default 120]
  local rc=0 p keep=() i
  kill -TERM "$PID_STRATA" 2>/dev/null || true
  for i in $(seq $(( ${1:-120} * 10 ))); do kill -0 "$PID_STRATA" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$PID_STRATA" 2>/dev/null; then
    log "strata (pid $PID_STRATA) did not stop within ${1:-120} s of SIGTERM; killing it"
    kill -KILL "$PID_STRATA" 2>/dev/null || true
  fi
  wait "$PID_STRATA" || rc=$?
  for p in "${PIDS[@]}"; do [ "$p" = "$PID_STRATA" ] || keep+=("$p"); done
  PIDS=("${keep[@]+"${keep[@]}"}")
  [ "$rc" -eq 0 ] || { log "strata exited with status $rc on SIGTERM; its log:"; tail -20 "$STRATA_LOG" >&2; exit 3; }
}
