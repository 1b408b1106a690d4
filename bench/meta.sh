#!/usr/bin/env bash
# bench/meta.sh - compare-and-swap throughput and latency of Strata's metadata service
# (3 `strata serve` members on loopback) against a 3-member etcd 3.4 cluster on loopback
# (../shared/peers/etcd.sh), in one run, with the same operation and the same load:
#
#   one CAS = linearizable read of the key's version, then
#             txn(if version(key) == v then put(key, value))       (success or conflict)
#   own: client i CASes its own key; contended: all clients CAS NKEYS shared keys;
#   client i talks to member i % 3 (members forward to the leader).
#
# Usage:  bench/meta.sh
# Env:    CLIENTS (1,16,64)  MODES (own,contended)  DUR (10)  WARMUP (1)  NKEYS (8)
#         VSIZE (64)  STRATA_BIN (else cargo build --release)  ETCD_SH (../shared/peers/etcd.sh)
#         SKIP_ETCD=1 (Strata only)  BENCH_DIR, KEEP_SCRATCH (see lib.sh)
# Needs:  python3, curl; for the peer: etcd-server etcd-client python3-venv (Debian) and
#         PyPI (etcd.sh installs its client, aetcd, into a venv).
# Output: both tables, then one line per case: strata ops/s, etcd ops/s, ratio, and
#         p50/p99 of each. Targets (issue 4): ratio >= 1.0, strata p99 <= etcd p99.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BENCH_NAME=meta
. "$ROOT/bench/lib.sh"

CLIENTS=${CLIENTS:-1,16,64}
MODES=${MODES:-own,contended}
DUR=${DUR:-10}
WARMUP=${WARMUP:-1}
NKEYS=${NKEYS:-8}
VSIZE=${VSIZE:-64}
ETCD_SH=${ETCD_SH:-$ROOT/../shared/peers/etcd.sh}
need_uint DUR WARMUP NKEYS VSIZE
need_tools python3 curl

resolve_strata
log "building the load generator: cargo build --release -p strata-meta --example casbench"
(cd "$ROOT" && cargo build --release -q -p strata-meta --example casbench) || die "cargo build failed"
tdir=${CARGO_TARGET_DIR:-target}
case $tdir in /*) ;; *) tdir=$ROOT/$tdir ;; esac
CASBENCH=$tdir/release/examples/casbench
make_scratch

# --- Strata: three members -----------------------------------------------------------
mapfile -t ports < <(free_ports 9)
endpoints=()
for i in 1 2 3; do
  d=$SCRATCH/n$i; mkdir -p "$d"
  rpc=127.0.0.1:${ports[$((i - 1))]}
  endpoints+=("$rpc")
  join=""; [ "$i" = 1 ] || join="\"${endpoints[0]}\""
  cat >"$SCRATCH/n$i.toml" <<EOF
node_id = $i
data_dir = "$d"
rpc = "$rpc"
nbd = "127.0.0.1:${ports[$((i + 2))]}"
http = "127.0.0.1:${ports[$((i + 5))]}"
join = [$join]
EOF
done
start_member() { # i
  "$STRATA" serve --config "$SCRATCH/n$1.toml" >>"$SCRATCH/n$1.log" 2>&1 &
  PIDS+=("$!")
  local j
  for j in $(seq 300); do
    grep -q "HTTP listening" "$SCRATCH/n$1.log" 2>/dev/null && return 0
    sleep 0.1
  done
  log "member $1 did not come up; its log:"; tail -20 "$SCRATCH/n$1.log" >&2; exit 3
}
API=http://127.0.0.1:${ports[6]}
start_member 1
scli cluster init >/dev/null
cp "$SCRATCH/n1/secret" "$SCRATCH/n2/secret"; cp "$SCRATCH/n1/secret" "$SCRATCH/n3/secret"
start_member 2; start_member 3
for j in $(seq 300); do
  voters=$(curl -fsS "$API/v1/cluster" 2>/dev/null |
    python3 -c 'import json,sys; print(sum(m["role"]=="voter" for m in json.load(sys.stdin)["cluster"]["members"]))' 2>/dev/null || echo 0)
  [ "$voters" = 3 ] && break
  [ "$j" = 300 ] && die "the Strata cluster did not reach 3 voters in 30 s"
  sleep 0.1
done
log "strata: 3 voters up (${endpoints[*]})"
"$CASBENCH" --endpoints "$(IFS=,; echo "${endpoints[*]}")" --secret "$SCRATCH/n1/secret" \
  --clients "$CLIENTS" --modes "$MODES" --duration "$DUR" --warmup "$WARMUP" \
  --nkeys "$NKEYS" --vsize "$VSIZE" | tee "$SCRATCH/strata.txt"
for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
PIDS=()

# --- etcd: three members ---------------------------------------------------------------
if [ "${SKIP_ETCD:-0}" = 1 ]; then
  log "SKIP_ETCD=1: no peer run"; exit 0
fi
[ -x "$ETCD_SH" ] || [ -f "$ETCD_SH" ] || die "no etcd peer script at $ETCD_SH"
command -v etcd >/dev/null || die "etcd missing: apt-get install -y etcd-server etcd-client python3-venv"
DIR=$SCRATCH/etcd CLIENTS=$CLIENTS MODES=$MODES DUR=$DUR WARMUP=$WARMUP NKEYS=$NKEYS \
  VSIZE=$VSIZE RESULTS=$SCRATCH/etcd.tsv VENV=${ETCD_VENV:-$BENCH_DIR/etcd-venv} \
  bash "$ETCD_SH" all | tee "$SCRATCH/etcd.txt"

# --- the comparison --------------------------------------------------------------------
python3 - "$SCRATCH/strata.txt" "$SCRATCH/etcd.tsv" <<'PY'
import sys
strata = {}
for line in open(sys.argv[1]):
    f = line.split()
    if len(f) >= 8 and f[0].isdigit():
        strata[(f[0], f[1])] = (float(f[2]), float(f[6]), float(f[7]))
etcd, cols = {}, None
for line in open(sys.argv[2]):
    if line.startswith("#"):
        continue
    f = line.rstrip("\n").split("\t")
    if f[0] == "clients":
        cols = f; continue
    r = dict(zip(cols, f))
    etcd[(r["clients"], r["mode"])] = (float(r["ops_s"]), float(r["p50_ms"]), float(r["p99_ms"]))
print()
print("| clients | mode | strata ops/s | etcd ops/s | ratio | strata p50/p99 ms | etcd p50/p99 ms | p99 <= etcd |")
print("|---|---|---|---|---|---|---|---|")
for k, (so, s50, s99) in strata.items():
    if k not in etcd:
        continue
    eo, e50, e99 = etcd[k]
    print(f"| {k[0]} | {k[1]} | {so:.0f} | {eo:.0f} | {so / eo:.2f} | {s50:.2f} / {s99:.2f} | {e50:.2f} / {e99:.2f} | {'yes' if s99 <= e99 else 'no'} |")
PY
