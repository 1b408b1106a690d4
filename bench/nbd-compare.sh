#!/usr/bin/env bash
# nbd-compare.sh - Strata vs qemu-nbd vs nbdkit, same fio workloads, same machine.
#
# Serves a 1 GiB volume from each of three NBD servers on loopback and runs the
# same fio workloads against each through /work/shared/tools/nbdbench.sh (and
# bench/fio-kv.sh for the workloads nbdbench does not have, with the same output):
#   strata    strata up ... ; volume "bench" (1G)      nbd://127.0.0.1:P1/bench
#   qemu-nbd  raw 1G file, -t -e 4 --cache=none --aio=native  nbd://127.0.0.1:P3/
#   nbdkit    raw 1G file, file plugin (defaults)      nbd://127.0.0.1:P4/
# Each target is prefilled once (sequential 1 MiB writes of the whole export),
# then for every repetition and workload the three targets run in a rotating
# order (rep 1: strata, qemu-nbd, nbdkit; rep 2: qemu-nbd, nbdkit, strata; ...)
# so drift on the host does not favour one of them.  Server CPU is measured
# with nbdbench -S (srv_us_per_io = server CPU microseconds per I/O).
#
# Usage (from anywhere; all options are environment variables):
#   bench/nbd-compare.sh
#   REPS=1 RUNTIME=2 RAMP=1 WORKLOADS=randread_4k_qd1 bench/nbd-compare.sh  # smoke
#   STRATA_BIN=target/release/strata REPS=5 bench/nbd-compare.sh
#
#   REPS       repetitions of the whole matrix                 (default 3)
#   RUNTIME    measured seconds per fio run                    (default 10)
#   RAMP       warm-up seconds per fio run, not measured       (default 2)
#   WORKLOADS  comma list of workloads (default: randread_4k_qd1,
#              randread_4k_qd32,randwrite_4k_qd1,randwrite_4k_qd32,
#              seqread_1m_qd8,seqwrite_1m_qd8,randwrite_4k_qd1_fsync,
#              randwrite_4k_4conn_fsync); the nbdbench ones plus
#              randwrite_4k_4conn_fsync: 4 NBD connections, each QD1 random 4k
#              writes with a FLUSH after every write (fio numjobs=4 iodepth=1
#              fsync=1 group_reporting), run by bench/fio-kv.sh unless nbdbench
#              knows it.  Its iops counts writes (the flushes are extra
#              requests); its kv line also has sync_p50_us/sync_p99_us.
#   STRATA_BIN path to a strata binary; skips `cargo build --release -p
#              strata-server` (which otherwise runs in the repo root and uses
#              $CARGO_TARGET_DIR, default <repo>/target)
#   BENCH_DIR  where the scratch dir (volumes, logs; removed on exit) and the
#              results file go                   (default <repo>/target/bench)
#   OUT        results file: every nbdbench kv line (+ rep=N), then the table
#              as '#' lines       (default $BENCH_DIR/results-YYYYmmdd-HHMMSS.txt)
#   NBDBENCH   path to nbdbench.sh         (default /work/shared/tools/nbdbench.sh)
#   FIOKV      path to fio-kv.sh, the runner for workloads nbdbench lacks
#              (default: fio-kv.sh beside this script)
#   KEEP_SCRATCH=1  keep the scratch dir (logs, images) after the run; it is
#              always kept, minus the images, when the script fails
#   TLS=1      every server over TLS (the TLS rows): a CA, a server certificate for
#              127.0.0.1 and a client certificate are made with openssl in qemu's
#              layout in the scratch dir; strata up --tls-dir DIR (require mode),
#              qemu-nbd --object tls-creds-x509,endpoint=server,dir=DIR,verify-peer=off
#              --tls-creds,
#              nbdkit --tls=require --tls-certificates=DIR; fio (libnbd) connects to
#              nbds://127.0.0.1:P/EXPORT. fio's nbd engine cannot pass credentials:
#              libnbd refuses ?tls-certificates= in a URI unless the program allows
#              local files (fio does not), so HOME points at a dir whose
#              .pki/libnbd holds the client's credentials (libnbd's default place).
#              The table's labels stay strata/qemu-nbd/nbdkit; the results file's
#              header says tls=1.                                   (default 0)
#
# Reading the table: medians over REPS of iops, p99 latency and srv_us_per_io;
# ratio = strata iops / max(qemu-nbd iops, nbdkit iops).  On this 2-core shared
# machine, differences under ~25% are noise; look at bg_cpu / cpu_psi in the kv
# lines before believing a small gap.  The target is ratio >= 1.0 on every row
# with strata's server CPU per I/O at or below nbdkit's.
# Caveats: qemu-nbd runs with O_DIRECT (--cache=none), so its reads never hit
# the page cache; nbdkit's file plugin and strata (pread/pwrite + fdatasync on
# FLUSH) are buffered, so after the prefill their reads are page-cache hits.
#
# Needs: fio (with the nbd engine), qemu-nbd, nbdkit (+ file plugin), nbdinfo,
# python3, curl; cargo unless STRATA_BIN is given; openssl with TLS=1.  Runtime is roughly
# REPS * workloads * 3 * (RUNTIME + RAMP + ~1 s) plus the build and prefills.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REPS=${REPS:-3}
RUNTIME=${RUNTIME:-10}
RAMP=${RAMP:-2}
WORKLOADS=${WORKLOADS:-randread_4k_qd1,randread_4k_qd32,randwrite_4k_qd1,randwrite_4k_qd32,seqread_1m_qd8,seqwrite_1m_qd8,randwrite_4k_qd1_fsync,randwrite_4k_4conn_fsync}
NBDBENCH=${NBDBENCH:-/work/shared/tools/nbdbench.sh}
FIOKV=${FIOKV:-$ROOT/bench/fio-kv.sh}
BENCH_DIR=${BENCH_DIR:-$ROOT/target/bench}
SIZE=1G

die() { echo "nbd-compare: $*" >&2; exit 2; }
log() { echo "nbd-compare: $*" >&2; }

# --- tools ---------------------------------------------------------------------
missing=()
for t in fio qemu-nbd nbdkit nbdinfo python3 curl; do
  command -v "$t" >/dev/null || missing+=("$t")
done
[ -n "${STRATA_BIN:-}" ] || command -v cargo >/dev/null || missing+=(cargo)
if [ ${#missing[@]} -gt 0 ]; then
  die "missing tool(s): ${missing[*]}  (Debian: apt-get install fio qemu-utils nbdkit libnbd-bin python3 curl)"
fi
fio --enghelp 2>/dev/null | grep -qw nbd || die "this fio has no nbd ioengine (need fio >= 3.26 built with libnbd)"
nbdkit file --dump-plugin >/dev/null 2>&1 || die "nbdkit has no file plugin (apt-get install nbdkit)"
[ -x "$NBDBENCH" ] || [ -r "$NBDBENCH" ] || die "nbdbench.sh not found at $NBDBENCH (set NBDBENCH=)"
[ -r "$FIOKV" ] || die "fio-kv.sh not found at $FIOKV (set FIOKV=)"
for v in REPS RUNTIME RAMP; do
  [[ ${!v} =~ ^[0-9]+$ ]] && [ "${!v}" -ge 0 ] || die "$v must be a whole number, got '${!v}'"
done
[ "$REPS" -ge 1 ] && [ "$RUNTIME" -ge 1 ] || die "REPS and RUNTIME must be >= 1"
IFS=, read -r -a WL <<<"$WORKLOADS"
[ ${#WL[@]} -gt 0 ] || die "WORKLOADS is empty"
for w in "${WL[@]}"; do
  case $w in
    randwrite_4k_qd1|randwrite_4k_qd32|randread_4k_qd1|randread_4k_qd32|seqwrite_1m_qd8|seqread_1m_qd8|\
    randwrite_4k_qd1_fsync|randread_4k_4x8|randwrite_4k_4x8|randwrite_4k_4conn_fsync) ;;
    *) die "unknown workload '$w' (see the header of $NBDBENCH and of this script)" ;;
  esac
done
# runner_for WORKLOAD: nbdbench.sh when it knows the workload, else bench/fio-kv.sh
# (same options, same kv line).
runner_for() {
  if grep -qE "^[[:space:]]*$1\)" "$NBDBENCH"; then echo "$NBDBENCH"; else echo "$FIOKV"; fi
}

# --- strata binary -------------------------------------------------------------
if [ -n "${STRATA_BIN:-}" ]; then
  [ -x "$STRATA_BIN" ] || die "STRATA_BIN=$STRATA_BIN is not an executable file"
  STRATA=$(cd "$(dirname "$STRATA_BIN")" && pwd)/$(basename "$STRATA_BIN")
else
  log "building: cargo build --release -p strata-server (in $ROOT)"
  (cd "$ROOT" && cargo build --release -p strata-server) || die "cargo build failed"
  tdir=${CARGO_TARGET_DIR:-target}
  case $tdir in /*) ;; *) tdir=$ROOT/$tdir ;; esac
  STRATA=$tdir/release/strata
  [ -x "$STRATA" ] || die "build finished but $STRATA is missing"
fi

# --- scratch dir, cleanup ------------------------------------------------------
mkdir -p "$BENCH_DIR"
SCRATCH=$(mktemp -d "$BENCH_DIR/run.XXXXXX")
OUT=${OUT:-$BENCH_DIR/results-$(date +%Y%m%d-%H%M%S).txt}
mkdir -p "$(dirname "$OUT")"
: >"$OUT"
PIDS=()
cleanup() {
  local rc=$? p
  trap - EXIT INT TERM
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  if [ "$rc" -ne 0 ] || [ "${KEEP_SCRATCH:-0}" = 1 ]; then
    # keep the logs for diagnosis; drop the 1 GiB images unless KEEP_SCRATCH=1
    if [ "${KEEP_SCRATCH:-0}" != 1 ]; then rm -f "$SCRATCH"/*.raw; rm -rf "$SCRATCH/strata-data"; fi
    log "logs kept in $SCRATCH"
  else
    rm -rf "$SCRATCH"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_ports() { # N -> N distinct free loopback TCP ports, one per line
  python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
for s in socks: print(s.getsockname()[1])
for s in socks: s.close()
PY
}
# --- TLS credentials (TLS=1) ------------------------------------------------------
TLS=${TLS:-0}
TLS_DIR=$SCRATCH/tls
make_tls() { # CA, server (127.0.0.1) and one client certificate, qemu's layout
  local d=$TLS_DIR
  mkdir -p "$d/client"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj "/CN=bench CA" -keyout "$d/ca-key.pem" -out "$d/ca-cert.pem" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
  issue() { # key cert cn ext
    printf '%b' "$4" >"$2.ext"
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=$3" \
      -keyout "$1" -out "$2.csr" 2>/dev/null
    openssl x509 -req -in "$2.csr" -CA "$d/ca-cert.pem" -CAkey "$d/ca-key.pem" -CAcreateserial \
      -days 2 -out "$2" -extfile "$2.ext" 2>/dev/null
  }
  issue "$d/server-key.pem" "$d/server-cert.pem" "bench server" \
    "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
  cp "$d/ca-cert.pem" "$d/client/"
  issue "$d/client/client-key.pem" "$d/client/client-cert.pem" "bench client" \
    "extendedKeyUsage=clientAuth\n"
  chmod 600 "$d"/*-key.pem "$d"/client/*-key.pem
}
STRATA_TLS=(); QEMU_TLS=(); KIT_TLS=(); SCHEME=nbd; QUERY=
if [ "$TLS" = 1 ]; then
  command -v openssl >/dev/null || die "TLS=1 needs openssl"
  make_tls
  STRATA_TLS=(--tls-dir "$TLS_DIR")
  # verify-peer=off: libnbd from its default place (below) sends no client certificate;
  # nbdkit and strata do not require one either.
  QEMU_TLS=(--object "tls-creds-x509,id=tls0,endpoint=server,dir=$TLS_DIR,verify-peer=off" --tls-creds tls0)
  KIT_TLS=(--tls=require "--tls-certificates=$TLS_DIR")
  SCHEME=nbds; QUERY=
  mkdir -p "$SCRATCH/home/.pki"
  cp -r "$TLS_DIR/client" "$SCRATCH/home/.pki/libnbd"
  export HOME=$SCRATCH/home
fi

mapfile -t PORTS < <(free_ports 4)
P_NBD=${PORTS[0]}; P_HTTP=${PORTS[1]}; P_QEMU=${PORTS[2]}; P_KIT=${PORTS[3]}

wait_alive() { # pid name logfile: fail if the process died
  kill -0 "$1" 2>/dev/null || { log "$2 exited during startup; its log ($3):"; tail -20 "$3" >&2; exit 3; }
}
wait_nbd() { # uri pid name logfile
  local i
  for i in $(seq 100); do
    wait_alive "$2" "$3" "$4"
    nbdinfo --size "$1" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  log "$3 did not serve $1 within 20 s; its log ($4):"; tail -20 "$4" >&2; exit 3
}

# --- start the servers ---------------------------------------------------------
log "strata: $STRATA ($("$STRATA" --version 2>/dev/null || echo '?'))"
# With --tls-dir the API is HTTPS too, verified with the same CA.
API_STRATA=http://127.0.0.1:$P_HTTP; CURL_TLS=(); CLI_TLS=()
if [ "$TLS" = 1 ]; then
  API_STRATA=https://127.0.0.1:$P_HTTP
  CURL_TLS=(--cacert "$TLS_DIR/ca-cert.pem"); CLI_TLS=(--cacert "$TLS_DIR/ca-cert.pem")
fi
"$STRATA" up --data-dir "$SCRATCH/strata-data" --nbd "127.0.0.1:$P_NBD" --http "127.0.0.1:$P_HTTP" \
  --rpc "127.0.0.1:0" "${STRATA_TLS[@]}" >"$SCRATCH/strata.log" 2>&1 &
PID_STRATA=$!; PIDS+=("$PID_STRATA")
for i in $(seq 150); do
  wait_alive "$PID_STRATA" strata "$SCRATCH/strata.log"
  grep -q "NBD listening on" "$SCRATCH/strata.log" && curl -fsS "${CURL_TLS[@]}" "$API_STRATA/v1/node" >/dev/null 2>&1 && break
  [ "$i" = 150 ] && { log "strata did not come up in 30 s:"; tail -20 "$SCRATCH/strata.log" >&2; exit 3; }
  sleep 0.2
done
"$STRATA" --api "$API_STRATA" "${CLI_TLS[@]}" volume create bench --size "$SIZE" >"$SCRATCH/create.log" 2>&1 \
  || { log "strata volume create failed:"; cat "$SCRATCH/create.log" >&2; exit 3; }
URI_STRATA=$SCHEME://127.0.0.1:$P_NBD/bench$QUERY
wait_nbd "$URI_STRATA" "$PID_STRATA" strata "$SCRATCH/strata.log"

truncate -s "$SIZE" "$SCRATCH/qemu.raw" "$SCRATCH/nbdkit.raw"
qemu-nbd -f raw -t -e 4 --cache=none --aio=native -b 127.0.0.1 -p "$P_QEMU" "${QEMU_TLS[@]}" "$SCRATCH/qemu.raw" \
  >"$SCRATCH/qemu-nbd.log" 2>&1 &
PID_QEMU=$!; PIDS+=("$PID_QEMU")
URI_QEMU=$SCHEME://127.0.0.1:$P_QEMU/$QUERY
wait_nbd "$URI_QEMU" "$PID_QEMU" qemu-nbd "$SCRATCH/qemu-nbd.log"

nbdkit -f --exit-with-parent -i 127.0.0.1 -p "$P_KIT" "${KIT_TLS[@]}" file "$SCRATCH/nbdkit.raw" \
  >"$SCRATCH/nbdkit.log" 2>&1 &
PID_KIT=$!; PIDS+=("$PID_KIT")
URI_KIT=$SCHEME://127.0.0.1:$P_KIT/$QUERY
wait_nbd "$URI_KIT" "$PID_KIT" nbdkit "$SCRATCH/nbdkit.log"


NAMES=(strata qemu-nbd nbdkit)
URIS=("$URI_STRATA" "$URI_QEMU" "$URI_KIT")
SPIDS=("$PID_STRATA" "$PID_QEMU" "$PID_KIT")
for i in 0 1 2; do log "${NAMES[$i]}: ${URIS[$i]} (pid ${SPIDS[$i]})"; done

{
  echo "# nbd-compare $(date -u +%FT%TZ) host=$(hostname) ncpu=$(getconf _NPROCESSORS_ONLN) reps=$REPS runtime=${RUNTIME}s ramp=${RAMP}s size=$SIZE tls=$TLS"
  echo "# strata=$STRATA ($("$STRATA" --version 2>/dev/null || echo '?')) repo_head=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo NA)"
  echo "# $(qemu-nbd --version 2>/dev/null | head -1); $(nbdkit --version 2>/dev/null | head -1); $(fio --version)"
  echo "# workloads=$WORKLOADS"
} >>"$OUT"

# --- prefill: every byte written once, so reads hit allocated data ---------------
for i in 0 1 2; do
  log "prefill ${NAMES[$i]} ($SIZE, 1 MiB sequential writes)"
  t0=$(date +%s.%N)
  fio --name=prefill --ioengine=nbd --uri="${URIS[$i]}" --rw=write --bs=1m --iodepth=8 \
      --output-format=json --output="$SCRATCH/prefill-${NAMES[$i]}.json" >"$SCRATCH/prefill-${NAMES[$i]}.err" 2>&1 \
    || { log "prefill of ${NAMES[$i]} failed:"; tail -5 "$SCRATCH/prefill-${NAMES[$i]}.err" >&2; exit 3; }
  t1=$(date +%s.%N)
  echo "# prefill ${NAMES[$i]} $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f s", b-a}')" >>"$OUT"
done
sync

# --- the matrix ------------------------------------------------------------------
total=$(( REPS * ${#WL[@]} * 3 )); n=0
log "running $total fio runs of ${RUNTIME}+${RAMP} s; results -> $OUT"
for ((rep = 1; rep <= REPS; rep++)); do
  for w in "${WL[@]}"; do
    for k in 0 1 2; do
      i=$(( (rep - 1 + k) % 3 )); n=$((n + 1))
      # the server must still be alive, or its numbers would be fio errors
      kill -0 "${SPIDS[$i]}" 2>/dev/null || { log "${NAMES[$i]} (pid ${SPIDS[$i]}) died; log:"; tail -20 "$SCRATCH/${NAMES[$i]}.log" >&2; exit 4; }
      # Start every run with no dirty pages: otherwise the previous run's writeback (of
      # whichever server wrote last) lands on this run's measurement.
      sync
      line=$(bash "$(runner_for "$w")" -P -t "$RUNTIME" -r "$RAMP" -w "$w" -l "${NAMES[$i]}" -S "${SPIDS[$i]}" -f kv "${URIS[$i]}" \
               2>>"$SCRATCH/nbdbench.err" | grep '^nbdbench=1' || true)
      [ -n "$line" ] || line="nbdbench=1 label=${NAMES[$i]} workload=$w engine=NA iops=0 err=99"
      line="$line rep=$rep"
      echo "$line" >>"$OUT"
      printf '[%d/%d] %s\n' "$n" "$total" "$line" >&2
    done
  done
done

# --- summary table -----------------------------------------------------------------
TABLE=$(python3 - "$OUT" "$WORKLOADS" <<'PY'
import sys, statistics
path, wls = sys.argv[1], sys.argv[2].split(",")
rows, bad, bg = {}, [], []
for ln in open(path):
    if not ln.startswith("nbdbench=1 "): continue
    kv = dict(f.split("=", 1) for f in ln.split() if "=" in f)
    key = (kv.get("workload"), kv.get("label"))
    rows.setdefault(key, []).append(kv)
    try: iops = float(kv.get("iops", "0"))
    except ValueError: iops = 0
    if kv.get("err", "1") != "0" or iops <= 0:
        bad.append("%s/%s rep %s: err=%s iops=%s" % (key[1], key[0], kv.get("rep"), kv.get("err"), kv.get("iops")))
    try: bg.append(float(kv.get("bg_cpu")))
    except (TypeError, ValueError): pass
def med(wl, lab, field):
    vals = []
    for kv in rows.get((wl, lab), []):
        if kv.get("err") != "0": continue
        try: vals.append(float(kv[field]))
        except (KeyError, ValueError): pass
    return statistics.median(vals) if vals else None
def f(x, fmt="%.0f"): return "-" if x is None else fmt % x
T = ["strata", "qemu-nbd", "nbdkit"]
hdr = ["workload"] + ["%s iops" % t for t in T] + ["ratio s/best"] + \
      ["%s p99us" % t for t in T] + ["%s srv_us/io" % t for t in T]
out = []
for wl in wls:
    i = {t: med(wl, t, "iops") for t in T}
    peers = [i[t] for t in T[1:] if i[t]]
    ratio = i["strata"] / max(peers) if i["strata"] and peers else None
    out.append([wl] + [f(i[t]) for t in T] + [f(ratio, "%.2f")] +
               [f(med(wl, t, "p99_us"), "%.1f") for t in T] +
               [f(med(wl, t, "srv_us_per_io"), "%.1f") for t in T])
w = [max(len(r[c]) for r in [hdr] + out) for c in range(len(hdr))]
fmt = lambda r: " | ".join(c.ljust(w[0]) if j == 0 else c.rjust(w[j]) for j, c in enumerate(r))
print(fmt(hdr)); print("-+-".join("-" * x for x in w))
for r in out: print(fmt(r))
print("(medians over reps; ratio = strata iops / best peer iops; differences < ~25% are noise here)")
if bg: print("bg_cpu (CPU%% of other processes during runs): median %.1f, max %.1f%s" %
              (statistics.median(bg), max(bg), "  <- noisy host" if max(bg) > 20 else ""))
if bad:
    print("FAILED RUNS (%d):" % len(bad))
    for b in bad: print("  " + b)
PY
)
echo
echo "$TABLE"
sed 's/^/# /' <<<"$TABLE" >>"$OUT"
echo
echo "kv lines + table: $OUT"
if grep -q '^FAILED RUNS' <<<"$TABLE"; then exit 1; fi
