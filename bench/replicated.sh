#!/usr/bin/env bash
# bench/replicated.sh - a 3-way replicated Strata volume vs one-node Strata vs Ceph RBD
# (3 OSDs, pool size 3), same 4k fio workloads, all on this one machine, in one run.
#
#   strata RF=3    three `strata serve --config nI.toml` members on loopback (node 1
#                  founds the cluster, 2 and 3 join with its secret); volume "bench"
#                  1G --replicas 3 (copies on nodes 1,2,3; node 1 owns it); fio drives
#                  node 1's export nbd://NBD1/bench through /work/shared/tools/nbdbench.sh;
#                  the read workloads run again through node 2 (not the owner, holds a
#                  copy: read from it under the owner's read lease), their own rows
#   strata 1-node  `strata up` (bench/lib.sh start_strata), volume "bench" 1G, same runs
#   ceph           /work/shared/peers/ceph.sh start (NOSD=3 SIZE=3 IMG_GB=1, bluestore on
#                  files, rbd cache off so the OSDs ack every write), fio's rbd engine on
#                  the 1G image rbd/img with nbdbench's fio flags, then ceph.sh stop
# Each target is prefilled once (sequential 1 MiB writes, QD8, whole volume), then runs
# every workload REPS times; targets run one after the other (never at the same time).
#
# Usage (from anywhere; options are environment variables):
#   bench/replicated.sh
#   STRATA_BIN=target/release/strata RUNTIME=10 bench/replicated.sh
#   SKIP_CEPH=1 RUNTIME=2 RAMP=1 WORKLOADS=randwrite_4k_qd1 bench/replicated.sh   # smoke
#
#   RUNTIME    measured seconds per fio run                      (default 10)
#   RAMP       warm-up seconds per run, not measured             (default 2)
#   REPS       repetitions of each workload per target (median)  (default 1)
#   WORKLOADS  comma list (default randwrite_4k_qd1,randwrite_4k_qd32,randread_4k_qd1,
#              randread_4k_qd32,randwrite_4k_qd1_fsync,randwrite_4k_qd1_fua):
#                randwrite/randread_4k_qd1/qd32  nbdbench's workloads
#                randwrite_4k_qd1_fsync  QD1 4k random writes, a FLUSH after each (fio
#                                        fsync=1; iops counts the writes)
#                randwrite_4k_qd1_fua    QD1 4k random writes with the NBD FUA flag.  fio's
#                                        nbd engine cannot send FUA (it passes flags=0 to
#                                        nbd_aio_pwrite), so this row is driven by a small
#                                        libnbd Python loop (python3-libnbd), not fio: same
#                                        ramp/runtime, latency = the synchronous call, which
#                                        adds the interpreter's few us per write.  Strata
#                                        only (librbd has no FUA; Ceph's plain write row,
#                                        rbd cache off, is already acked by the OSDs).
#   STRATA_BIN path to a strata binary (else cargo build --release -p strata-server)
#   SKIP_CEPH=1  Strata rows only
#   SKIP_PLAINTEXT=1  no second RF3 cluster with inter-node records in plaintext (by
#              default the randwrite_* workloads run again on a fresh 3-member cluster
#              started with the bench-only STRATA_BENCH_INTERNODE_PLAINTEXT=1: the
#              handshake authenticates, records go unencrypted; rows "rf3plain" and the
#              "inter-node encryption" block: iops, p99 and CPU us per write on vs off)
#   (every row's kv line has srv_cpu, % of one CPU used by all the target's processes,
#   and srv_cpu_each, per process; the table's "write path's cost" block turns them
#   into CPU us per write, RF3 summed and per member, against one node's)
#   SKIP_RESYNC=1  no resync/failover/pause measurements (below)
#   SKIP_PAUSE=1   no paused-copy measurement (below)
#   PAUSE_SECS     how long a copy's node is stopped, one run each      (default "3 15")
#   PAUSE_AT, PAUSE_AFTER  seconds of writes before / after the pause   (default 3, 5)
#   RESYNC_LOAD_SECS  seconds of random writes while node 3 is away      (default 20)
#   RESYNC_TIMEOUT    longest wait for a returned copy to be active, s   (default 600)
#   FAILOVER_KILL_AT  seconds into the failover writer when node 1 dies  (default 5)
#   FAILOVER_AFTER    seconds the writer goes on after that              (default 25)
#   CEPH_SH    path to ceph.sh                 (default /work/shared/peers/ceph.sh)
#   NBDBENCH   path to nbdbench.sh             (default /work/shared/tools/nbdbench.sh)
#   BENCH_DIR, KEEP_SCRATCH  see bench/lib.sh (scratch dir: data, logs; removed on
#              success unless KEEP_SCRATCH=1, kept minus the data when the script fails)
#   OUT        results file: one kv line per run, then the table as '#' lines
#              (default $BENCH_DIR/replicated-YYYYmmdd-HHMMSS.txt)
#
# Output: one table, per workload: RF3 iops and p99, one-node iops and p99, Ceph iops and
# p99, RF3/ceph and RF3/one-node with the issue's targets beside them (>= 10x Ceph on 4k
# random write QD1/QD32, >= 3x on 4k random read, >= 0.5x one-node Strata everywhere),
# then the durable-write check: Strata RF3's durable row (FUA, and write+FLUSH) vs Ceph's
# 4k QD1 write row, target >= 3x.  Then host noise per target: bg_cpu (CPU% of processes
# that are neither fio nor the target's servers: for RF3 all three members count as
# servers) and cpu_psi (% of wall time a runnable task waited for a CPU; > ~10 = contended).
# Every RF3 run also records the copies' states before and after it (all "active" means
# the writes really went to 3 copies).
#
# Then, on the same RF3 cluster (after its fio rows, unless SKIP_RESYNC=1), two faults:
#   resync     one NBD FLUSH through node 1 (python3-libnbd, else qemu-io: a failed
#              copy's bitmap also takes every region written since its last flush, and
#              nothing above flushes), then kill -9 node 3; fio randwrite 4k QD16 over
#              the whole volume through node 1's export for RESYNC_LOAD_SECS (fio's
#              random map on: no 4k block is written twice until the volume is
#              covered, so "written" = bytes the client changed); wait until the
#              owner shows copy 3 stale and its dirty_bytes (the bitmap's 64 KiB
#              regions); restart node 3 (same config) and poll the owner's info every 0.2 s until copy 3 is active.  Prints:
#              bytes written while away, dirty bytes, resynced bytes (its resynced_bytes
#              minus the value before), resync time (restart -> active; also when the
#              node answered and when the copy was first seen resyncing), throughput
#              (resynced / time, MB/s = 10^6 B/s), amplification resynced/written
#              (the 64 KiB granularity's cost under 4k random writes; beside dirty,
#              the ~bytes N uniform random 4k writes touch in 64 KiB regions: at ~6k
#              writes/s, 20 s touch nearly all 16384, so try RESYNC_LOAD_SECS=2 too) and
#              resynced/dirty (issue's target: <= 1.25).
#   failover   fio randwrite 4k QD1 through node 2's export (a non-owner: it forwards to
#              the owner) with a per-write latency log (--write_lat_log, log_avg_msec=0);
#              kill -9 node 1 (the owner) FAILOVER_KILL_AT s in; the writer goes on
#              FAILOVER_AFTER s more.  Prints: the longest gap between two completed
#              writes (= the stall the client saw) and where it was, the longest write
#              latency, fio's error (must be 0), writes and writes/s before/after the
#              gap (after it, node 1's copy is stale), and the
#              owner and epoch before and after.  Then node 1 is restarted and the run
#              waits until all three copies are active (its copy's dirty/resynced bytes
#              and time are printed too).
#   pause      fio randwrite 4k QD1 through the owner's export; a member holding a copy
#              (not the owner) is stopped with SIGSTOP for each of PAUSE_SECS, then
#              continued.  Prints the longest gap between completed writes (the stall a
#              client saw), the longest write, the copies' states as the pause ended and
#              how long until the copy was ACTIVE again: the trade-off io_timeout (10 s,
#              strata_replica::timing) sets between stalling writes and marking a copy
#              STALE (a pause shorter than it: a stall that long, the copy stays ACTIVE;
#              longer: a stall of io_timeout, the copy STALE, then resynced).
# These print as a block after the table ("resync/failover") and as kv lines
# bench=replicated-resync / bench=replicated-failover in OUT; a failed fault run (no
# resync within RESYNC_TIMEOUT, a fio error, copies not all active at the end) makes
# the script exit 1.  The members' warn/error lines of this part go to
# rf3/problems-faults.log in the scratch dir (KEEP_SCRATCH=1 keeps it).
#
# Caveats: a 2-core VM; fio, all three Strata members (or all Ceph daemons) and the
# machine's other work share those 2 cores and one virtual disk, so the replicas'
# network is loopback and their "disks" are the same disk: this measures the software's
# cost per I/O, not a real deployment's.  Ceph's OSDs use bluestore on sparse files.
# Single runs here drift by ~25%; believe small gaps only with low bg_cpu/cpu_psi.
#
# Needs: fio (nbd and rbd engines), nbdinfo, python3, curl; python3-libnbd for the FUA
# row; for Ceph: apt-get install -y --no-install-recommends ceph-mon ceph-osd ceph-mgr
# ceph-common rbd-nbd fio jq (uuidgen).  Ceph's monitor binds 127.0.0.1:3300 and :6789.
# Time: about 3 * workloads * REPS * (RUNTIME + RAMP + 2 s) + prefills + ~1-2 min Ceph
# start/stop (~6-8 min with the defaults), plus the faults: RESYNC_LOAD_SECS +
# FAILOVER_KILL_AT + FAILOVER_AFTER + the two resyncs (up to ~1 GiB each).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_NAME=replicated
. "$ROOT/bench/lib.sh"

RUNTIME=${RUNTIME:-10}
RAMP=${RAMP:-2}
REPS=${REPS:-1}
WORKLOADS=${WORKLOADS:-randwrite_4k_qd1,randwrite_4k_qd32,randread_4k_qd1,randread_4k_qd32,randwrite_4k_qd1_fsync,randwrite_4k_qd1_fua}
NBDBENCH=${NBDBENCH:-/work/shared/tools/nbdbench.sh}
CEPH_SH=${CEPH_SH:-/work/shared/peers/ceph.sh}
SIZE=1G
RESYNC_LOAD_SECS=${RESYNC_LOAD_SECS:-20}
RESYNC_TIMEOUT=${RESYNC_TIMEOUT:-600}
FAILOVER_KILL_AT=${FAILOVER_KILL_AT:-5}
FAILOVER_AFTER=${FAILOVER_AFTER:-25}
PAUSE_SECS=${PAUSE_SECS:-3 15}
PAUSE_AT=${PAUSE_AT:-3}
PAUSE_AFTER=${PAUSE_AFTER:-5}
need_uint RUNTIME RAMP REPS RESYNC_LOAD_SECS RESYNC_TIMEOUT FAILOVER_KILL_AT FAILOVER_AFTER PAUSE_AT PAUSE_AFTER
[ "$RUNTIME" -ge 1 ] && [ "$REPS" -ge 1 ] || die "RUNTIME and REPS must be >= 1"
need_tools fio nbdinfo python3 curl
need_fio_nbd
[ -r "$NBDBENCH" ] || die "nbdbench.sh not found at $NBDBENCH (set NBDBENCH=)"
IFS=, read -r -a WL <<<"$WORKLOADS"
[ ${#WL[@]} -gt 0 ] || die "WORKLOADS is empty"

# fio arguments of each workload (nbdbench's, plus the ones this script adds)
wl_args() {
  case $1 in
    randwrite_4k_qd1)       echo "--rw=randwrite --bs=4k --iodepth=1" ;;
    randwrite_4k_qd32)      echo "--rw=randwrite --bs=4k --iodepth=32" ;;
    randread_4k_qd1)        echo "--rw=randread --bs=4k --iodepth=1" ;;
    randread_4k_qd32)       echo "--rw=randread --bs=4k --iodepth=32" ;;
    randwrite_4k_qd1_fsync) echo "--rw=randwrite --bs=4k --iodepth=1 --fsync=1" ;;
    randwrite_4k_qd1_fua)   echo "libnbd" ;;
    *) return 1 ;;
  esac
}
for w in "${WL[@]}"; do wl_args "$w" >/dev/null || die "unknown workload '$w' (see the header)"; done

# a Python with libnbd's bindings, for the FUA row (Debian's python3-libnbd lives in
# /usr/bin/python3's path; a pyenv python3 first on PATH does not see it)
PYNBD=
for py in python3 /usr/bin/python3; do
  if command -v "$py" >/dev/null && "$py" -c 'import nbd' 2>/dev/null; then PYNBD=$py; break; fi
done

resolve_strata
make_scratch
OUT=${OUT:-$BENCH_DIR/replicated-$(date +%Y%m%d-%H%M%S).txt}
: >"$OUT"
T_START=$(date +%s)
CEPH_DIR=$SCRATCH/ceph
CEPH_STARTED=0
CEPH_WHY=
bench_teardown() {
  if [ "$CEPH_STARTED" = 1 ]; then
    DIR=$CEPH_DIR bash "$CEPH_SH" stop >>"$SCRATCH/ceph-stop.log" 2>&1 || true
  fi
  # the OSDs' block files and the monitor's store are big; the logs stay
  if [ "${KEEP_SCRATCH:-0}" != 1 ]; then
    rm -rf "$CEPH_DIR"/osd.* "$CEPH_DIR"/mon.* "$CEPH_DIR"/mgr.* "$SCRATCH"/rf3/n[123]/ 2>/dev/null || true
  fi
}

{
  echo "# replicated $(date -u +%FT%TZ) host=$(hostname) ncpu=$(getconf _NPROCESSORS_ONLN) reps=$REPS runtime=${RUNTIME}s ramp=${RAMP}s size=$SIZE"
  echo "# strata=$STRATA ($("$STRATA" --version 2>/dev/null || echo '?')) repo_head=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo NA)"
  echo "# $(fio --version) workloads=$WORKLOADS"
} >>"$OUT"

# --- CPU accounting over one run (same formulas as nbdbench.sh, but the "server" is
# every process of the target: the three members for RF3, all Ceph daemons) -----------
HZ=$(getconf CLK_TCK)
host_busy() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9; exit}' /proc/stat; }
pids_cpu() { # PID... -> utime+stime jiffies summed
  local s=0 p
  for p in "$@"; do
    [ -r "/proc/$p/stat" ] && s=$((s + $(sed 's/^.*) //' "/proc/$p/stat" | awk '{print $12+$13}')))
  done
  echo "$s"
}
self_children_cpu() { sed 's/^.*) //' "/proc/$$/stat" | awk '{print $14+$15}'; }
psi_us() { if [ -r /proc/pressure/cpu ]; then awk '/^some/{sub("total=","",$5); print $5}' /proc/pressure/cpu; else echo NA; fi; }
SRV_PIDS=()
each_cpu() { local p out=; for p in "${SRV_PIDS[@]}"; do out+="${out:+/}$(pids_cpu "$p")"; done; echo "${out:-0}"; }
meas_begin() { M0="$(host_busy) $(pids_cpu "${SRV_PIDS[@]}") $(self_children_cpu) $(psi_us) $(date +%s%N) $(each_cpu)"; }
meas_end() { # -> MEAS="srv_cpu=.. cli_cpu=.. host_busy=.. bg_cpu=.. cpu_psi=.. srv_cpu_each=a/b/c"
  local b0 s0 c0 q0 t0 e0 b1 s1 c1 q1 t1 e1
  read -r b0 s0 c0 q0 t0 e0 <<<"$M0"
  b1=$(host_busy); s1=$(pids_cpu "${SRV_PIDS[@]}"); c1=$(self_children_cpu); q1=$(psi_us); t1=$(date +%s%N)
  e1=$(each_cpu)
  MEAS=$(awk -v b0="$b0" -v b1="$b1" -v s0="$s0" -v s1="$s1" -v c0="$c0" -v c1="$c1" \
             -v q0="$q0" -v q1="$q1" -v t0="$t0" -v t1="$t1" -v hz="$HZ" -v e0="$e0" -v e1="$e1" 'BEGIN{
    w=(t1-t0)/1e9; srv=(s1-s0)/hz/w*100; cli=(c1-c0)/hz/w*100; busy=(b1-b0)/hz/w*100;
    bg=busy-srv-cli; if (bg<0) bg=0;
    psi=(q0=="NA")?"NA":sprintf("%.1f",(q1-q0)/1e6/w*100);
    n=split(e0, a, "/"); split(e1, b, "/"); each="";
    for (i = 1; i <= n; i++) each = each (i > 1 ? "/" : "") sprintf("%.1f", (b[i]-a[i])/hz/w*100);
    printf "srv_cpu=%.1f cli_cpu=%.1f host_busy=%.1f bg_cpu=%.1f cpu_psi=%s srv_cpu_each=%s", srv, cli, busy, bg, psi, each}')
}

# --- runners: each prints one line "iops=.. p50_us=.. p99_us=.. p999_us=.. mean_us=.. ios=.. err=.." -----
kv_pick() { # LINE FIELD...
  local line=$1 f; shift
  for f in "$@"; do printf '%s=%s ' "$f" "$(grep -oE "(^| )$f=[^ ]*" <<<"$line" | head -1 | cut -d= -f2)"; done
}
run_nbdbench() { # URI WORKLOAD LABEL OWNER_PID
  local line
  line=$(bash "$NBDBENCH" -P -t "$RUNTIME" -r "$RAMP" -w "$2" -l "$3" -S "$4" -f kv "$1" \
           2>>"$SCRATCH/nbdbench.err" | grep '^nbdbench=1' || true)
  [ -n "$line" ] || { echo "iops=0 err=99"; return; }
  # nbdbench's own srv_cpu/bg_cpu count only the owner (-S) as the server: kept as nb_*
  echo "$(kv_pick "$line" iops p50_us p99_us p999_us mean_us ios err)nb_srv_cpu=$(kv_pick "$line" srv_cpu | cut -d= -f2 | tr -d ' ') nb_bg_cpu=$(kv_pick "$line" bg_cpu | cut -d= -f2 | tr -d ' ')"
}
gap_stats() { # FIO_JSON RC LAT_LOG -> kv: fio's error, writes, the longest gap between
  # completed writes (from the latency log, ms on fio's clock) and the write rates around it
  python3 - "$1" "$2" "$3" <<'PY'
import json, sys
js, rc, lat = sys.argv[1], int(sys.argv[2]), sys.argv[3]
err, ios, maxlat = rc, 0, None
try:
    raw = open(js).read(); j = json.loads(raw[raw.index('{'):])["jobs"][0]
    err = j.get("error", 0) or rc; ios = j["write"]["total_ios"]; maxlat = j["write"]["lat_ns"]["max"] / 1e6
except Exception:
    err = err or 98
ts = []
try:
    ts = [int(ln.split(",")[0]) for ln in open(lat) if ln.count(",") >= 1]
except OSError:
    pass
gap, at = None, None
for a, b in zip(ts, ts[1:]):
    if gap is None or b - a > gap: gap, at = b - a, a
nb = na = 0; rb = ra = "NA"
if at is not None:
    nb = sum(1 for t in ts if t <= at); na = len(ts) - nb
    if at > 0: rb = "%.0f" % (nb / (at / 1000.0))
    if na > 1 and ts[-1] > at + gap: ra = "%.0f" % ((na - 1) / ((ts[-1] - at - gap) / 1000.0))
na_ = lambda v: "NA" if v is None else v
print("err=%d writes=%d logged=%d max_gap_ms=%s gap_from_ms=%s max_lat_ms=%s writes_before_gap=%d writes_after_gap=%d iops_before_gap=%s iops_after_gap=%s" % (
    err, ios, len(ts), na_(gap), na_(at), "%.0f" % maxlat if maxlat is not None else "NA", nb, na, rb, ra))
PY
}

parse_fio_json() { # FILE -> kv (as nbdbench's parse: read+write summed, total latency)
  python3 - "$1" <<'PY'
import json, sys
try:
    raw = open(sys.argv[1]).read(); d = json.loads(raw[raw.index('{'):])
except Exception:
    print("iops=0 err=98"); sys.exit()
iops = ios = 0.0; lat = None; err = 0
for j in d["jobs"]:
    err = err or j.get("error", 0)
    for dd in ("read", "write"):
        s = j[dd]
        if s.get("total_ios", 0) == 0: continue
        iops += s["iops"]; ios += s["total_ios"]
        if lat is None or s["total_ios"] > lat[1]: lat = (s["lat_ns"], s["total_ios"])
if lat is None:
    print("iops=0 err=%d" % (err or 1)); sys.exit()
p = lat[0].get("percentile", {})
g = lambda k: "%.1f" % (p[k] / 1000.0) if k in p else "NA"
print("iops=%.0f p50_us=%s p99_us=%s p999_us=%s mean_us=%.1f ios=%d err=%d" % (
    iops, g("50.000000"), g("99.000000"), g("99.900000"), lat[0]["mean"] / 1000.0, ios, err))
PY
}
run_fio_rbd() { # WORKLOAD
  local json=$SCRATCH/ceph-$1.json args
  args=$(wl_args "$1")
  rm -f "$json"
  # shellcheck disable=SC2086
  CEPH_CONF=$CEPH_DIR/ceph.conf fio --name="$1" --ioengine=rbd --clientname=admin --pool=rbd --rbdname=img \
    $args --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" \
    --group_reporting --norandommap --randrepeat=1 \
    --lat_percentiles=1 --percentile_list=50:99:99.9 \
    --output-format=json --output="$json" >>"$SCRATCH/ceph-fio.err" 2>&1 || true
  parse_fio_json "$json"
}
FUA_PY=$SCRATCH/fua.py
cat >"$FUA_PY" <<'PY'
# QD1 random 4k writes with NBD_CMD_FLAG_FUA through libnbd; time-based like fio
import nbd, random, sys, time
uri, runtime, ramp = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
h = nbd.NBD()
h.connect_uri(uri)
if not h.can_fua():
    print("iops=0 err=95 note=server_without_fua"); sys.exit()
blocks = h.get_size() // 4096
rng = random.Random(1)
buf = bytes(rng.getrandbits(8) for _ in range(4096))
flag = nbd.CMD_FLAG_FUA
end_ramp = time.monotonic() + ramp
while time.monotonic() < end_ramp:
    h.pwrite(buf, rng.randrange(blocks) * 4096, flag)
lat = []
t_start = time.perf_counter_ns(); t_end = t_start + int(runtime * 1e9)
now = t_start
while now < t_end:
    off = rng.randrange(blocks) * 4096
    t0 = time.perf_counter_ns()
    h.pwrite(buf, off, flag)
    now = time.perf_counter_ns()
    lat.append(now - t0)
h.shutdown()
lat.sort(); n = len(lat)
pct = lambda q: "%.1f" % (lat[min(n - 1, int(q * n))] / 1000.0)
print("iops=%.0f p50_us=%s p99_us=%s p999_us=%s mean_us=%.1f ios=%d err=0" % (
    n / ((now - t_start) / 1e9), pct(0.50), pct(0.99), pct(0.999), sum(lat) / n / 1000.0, n))
PY
run_fua() { # URI
  [ -n "$PYNBD" ] || { echo "iops=0 err=96 note=no_python3-libnbd"; return; }
  "$PYNBD" "$FUA_PY" "$1" "$RUNTIME" "$RAMP" 2>>"$SCRATCH/fua.err" | tail -1 | grep '^iops=' || echo "iops=0 err=97"
}

# record LABEL WORKLOAD REP RESULT [EXTRA]: one kv line in $OUT and on stderr
NRUN=0
record() {
  local line="bench=replicated label=$1 workload=$2 $4 $MEAS ${5:-}rep=$3"
  line=$(tr -s ' ' <<<"$line")
  echo "$line" >>"$OUT"
  NRUN=$((NRUN + 1))
  printf '[%d] %s\n' "$NRUN" "$line" >&2
}

prefill_nbd() { # URI LABEL
  local t0 t1
  t0=$(date +%s.%N)
  fio --name=prefill --ioengine=nbd --uri="$1" --rw=write --bs=1m --iodepth=8 \
      --output-format=json --output="$SCRATCH/prefill-$2.json" >"$SCRATCH/prefill-$2.err" 2>&1 \
    || { log "prefill of $2 failed:"; tail -5 "$SCRATCH/prefill-$2.err" >&2; return 1; }
  t1=$(date +%s.%N)
  echo "# prefill $2 $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f s", b-a}')" >>"$OUT"
}

# =====================================================================================
# 1. Strata RF=3: three members
# =====================================================================================
mkdir -p "$SCRATCH/rf3"
mapfile -t ports < <(free_ports 9)
RPC=(); NBDA=(); HTTPA=(); NPID=()
for i in 1 2 3; do
  d=$SCRATCH/rf3/n$i; mkdir -p "$d"
  RPC+=("127.0.0.1:${ports[$((i - 1))]}")
  NBDA+=("127.0.0.1:${ports[$((i + 2))]}")
  HTTPA+=("127.0.0.1:${ports[$((i + 5))]}")
  join=""; [ "$i" = 1 ] || join="\"${RPC[0]}\""
  cat >"$SCRATCH/rf3/n$i.toml" <<EOF
node_id = $i
data_dir = "$d"
rpc = "${RPC[$((i - 1))]}"
nbd = "${NBDA[$((i - 1))]}"
http = "${HTTPA[$((i - 1))]}"
join = [$join]
site = "a"
rack = "r$i"
EOF
done
node_logs_tail() { # N lines of every member's log
  local i
  for i in 1 2 3; do echo "--- n$i.log (last $1 lines)"; tail -n "$1" "$SCRATCH/rf3/n$i.log" 2>/dev/null; done
}
start_member() { # i
  "$STRATA" serve --config "$SCRATCH/rf3/n$1.toml" >>"$SCRATCH/rf3/n$1.log" 2>&1 &
  NPID[$1]=$!; PIDS+=("$!")
  wait_up "${NPID[$1]}" "http://${HTTPA[$(($1 - 1))]}" "$SCRATCH/rf3/n$1.log" "member $1"
}
API=http://${HTTPA[0]}
log "strata RF=3: starting 3 members ($STRATA)"
start_member 1
scli cluster init >"$SCRATCH/rf3/init.log" 2>&1 || { log "cluster init failed:"; cat "$SCRATCH/rf3/init.log" >&2; exit 3; }
cp "$SCRATCH/rf3/n1/secret" "$SCRATCH/rf3/n2/secret"; cp "$SCRATCH/rf3/n1/secret" "$SCRATCH/rf3/n3/secret"
start_member 2; start_member 3
for j in $(seq 600); do
  ok=$(curl -fsS "$API/v1/cluster" 2>/dev/null | python3 -c '
import json, sys
ms = json.load(sys.stdin)["cluster"]["members"]
print(int(len(ms) == 3 and all(m["role"] == "voter" and m.get("session", {}).get("up") is True for m in ms)))' 2>/dev/null || echo 0)
  [ "$ok" = 1 ] && break
  [ "$j" = 600 ] && { log "the cluster did not reach 3 voters with sessions up in 60 s"; scli cluster status >&2 || true; node_logs_tail 10 >&2; exit 3; }
  sleep 0.1
done
log "strata RF=3: 3 voters, sessions up"
scli volume create bench --size "$SIZE" --replicas 3 --json >"$SCRATCH/rf3/create.json" 2>&1 \
  || { log "volume create --replicas 3 failed:"; cat "$SCRATCH/rf3/create.json" >&2; exit 3; }
placement=$(json_get "$SCRATCH/rf3/create.json" '",".join(str(c["node"]) for c in d["components"])')
log "strata RF=3: volume bench, copies on nodes $placement"
[ "$placement" = "1,2,3" ] || log "WARNING: copies are on nodes $placement, not 1,2,3"
# copies' states, as the owner shows them ("active,active,active"), and the owner
copy_states() {
  curl -fsS --max-time 5 "$API/v1/volumes/bench" 2>/dev/null | python3 -c '
import json, sys
v = json.load(sys.stdin)
print("owner=%s,epoch=%s,copies=%s" % (v.get("node"), v.get("epoch"), "/".join(str(c.get("state")) for c in v["components"])))' 2>/dev/null || echo "owner=?,copies=unknown"
}
for j in $(seq 300); do
  s=$(copy_states)
  [[ $s == *copies=active/active/active* ]] && break
  [ "$j" = 300 ] && { log "copies not all active after 30 s: $s"; node_logs_tail 10 >&2; exit 3; }
  sleep 0.1
done
URI_RF3=nbd://${NBDA[0]}/bench
PID_STRATA=${NPID[1]}; STRATA_LOG=$SCRATCH/rf3/n1.log
wait_nbd "$URI_RF3"
log "strata RF=3: $URI_RF3 ($s); prefill"
prefill_nbd "$URI_RF3" rf3 || { node_logs_tail 20 >&2; exit 3; }
echo "# rf3 after prefill: $(copy_states)" >>"$OUT"

SRV_PIDS=("${NPID[1]}" "${NPID[2]}" "${NPID[3]}")
RF3_TROUBLE=0
RF3_T0=$(date -u +%T)
for ((rep = 1; rep <= REPS; rep++)); do
  for w in "${WL[@]}"; do
    for i in 1 2 3; do
      kill -0 "${NPID[$i]}" 2>/dev/null || { log "member $i (pid ${NPID[$i]}) died:"; tail -30 "$SCRATCH/rf3/n$i.log" >&2; exit 4; }
    done
    before=$(copy_states)
    sync
    meas_begin
    if [ "$w" = randwrite_4k_qd1_fua ]; then r=$(run_fua "$URI_RF3"); else r=$(run_nbdbench "$URI_RF3" "$w" rf3 "${NPID[1]}"); fi
    meas_end
    after=$(copy_states)
    record rf3 "$w" "$rep" "$r" "before=$before after=$after "
    if [[ $r == *err=0* ]] && [[ $after == *copies=active/active/active* ]]; then :; else
      RF3_TROUBLE=1
      log "RF3 $w: result '$r', copies before '$before' after '$after'; members' recent log lines:"
      node_logs_tail 15 >&2
    fi
  done
done
# Reads through node 2, which does not own the volume but holds an ACTIVE copy: served
# from that copy under the owner's read lease (not forwarded to the owner).
URI_RF3_N2=nbd://${NBDA[1]}/bench
for ((rep = 1; rep <= REPS; rep++)); do
  for w in "${WL[@]}"; do
    [[ $w == randread_* ]] || continue
    sync
    meas_begin
    r=$(run_nbdbench "$URI_RF3_N2" "$w" rf3n2 "${NPID[2]}")
    meas_end
    record rf3n2 "$w" "$rep" "$r"
    [[ $r == *err=0* ]] || { RF3_TROUBLE=1; log "RF3 $w via node 2: result '$r'"; }
  done
done
RF3_T1=$(date -u +%T)
# every warning/error line the members logged (startup included), for the report
grep -iE 'warn|error|fail|stale|panick' "$SCRATCH"/rf3/n[123].log 2>/dev/null | sed "s|^$SCRATCH/rf3/||" >"$SCRATCH/rf3/problems.log" || true
echo "# rf3 members logged $(wc -l <"$SCRATCH/rf3/problems.log") warn/error lines; final: $(copy_states)" >>"$OUT"

# =====================================================================================
# 1b. Strata RF=3 under faults: resync of a copy that was away, failover of the owner
# =====================================================================================
FAULTS=
FAULT_TROUBLE=0
# vfield ADDR EXPR: EXPR over node ADDR's GET /v1/volumes/bench, as v (c(n): node n's
# copy); nothing when that node does not answer
vfield() {
  curl -fsS --max-time 3 "http://$1/v1/volumes/bench" 2>/dev/null | python3 -c '
import json, sys
try: v = json.load(sys.stdin)
except Exception: sys.exit()
c = lambda n: next(x for x in v["components"] if x["node"] == n)
print(eval(sys.argv[1]))' "$2" 2>/dev/null || true
}
# the owner as the first answering member of NODES... sees it: "NODE EPOCH" (or nothing)
owner_of() {
  local i o
  for i in "$@"; do
    o=$(vfield "${HTTPA[$((i - 1))]}" '"%s %s" % (v["node"], v["epoch"])')
    [ -n "$o" ] && { echo "$o"; return 0; }
  done
  return 0
}
# states as owner ADDR sees them: "state/state/state" by node 1,2,3
live_states() { vfield "$1" '"/".join(c(n)["state"] for n in (1, 2, 3))'; }
kill_member() { # i: kill -9, reaped, no longer in PIDS
  local p=${NPID[$1]} q keep=()
  kill -KILL "$p" 2>/dev/null || true
  { wait "$p"; } 2>/dev/null || true
  for q in "${PIDS[@]}"; do [ "$q" = "$p" ] || keep+=("$q"); done
  PIDS=("${keep[@]+"${keep[@]}"}")
}
drop_pid() { # PID: out of PIDS (it was waited for)
  local q keep=()
  for q in "${PIDS[@]}"; do [ "$q" = "$1" ] || keep+=("$q"); done
  PIDS=("${keep[@]+"${keep[@]}"}")
}
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.1f", b-a}'; }
# wait_active ADDR NODE TIMEOUT: polls owner ADDR every 0.2 s until node NODE's copy is
# active; sets T_SEEN_RESYNC (first time seen resyncing, or empty); returns 1 on timeout
wait_active() {
  local deadline st
  deadline=$(awk -v t="$(now)" -v d="$3" 'BEGIN{printf "%.0f", t+d}')
  T_SEEN_RESYNC=
  while :; do
    st=$(vfield "$1" "c($2)[\"state\"]")
    [ "$st" = active ] && return 0
    [ "$st" = resyncing ] && [ -z "$T_SEEN_RESYNC" ] && T_SEEN_RESYNC=$(now)
    [ "$(date +%s)" -ge "$deadline" ] && return 1
    sleep 0.2
  done
}
# faults_log_mark / faults_log_since: the members' log lines written since the mark
faults_log_mark() { local i; for i in 1 2 3; do LOGOFF[$i]=$(stat -c %s "$SCRATCH/rf3/n$i.log" 2>/dev/null || echo 0); done; }
faults_log_since() {
  local i
  for i in 1 2 3; do
    tail -c +$((LOGOFF[i] + 1)) "$SCRATCH/rf3/n$i.log" 2>/dev/null | sed "s|^|n$i.log:|"
  done
}
LOGOFF=()

if [ "${SKIP_RESYNC:-0}" = 1 ]; then
  FAULTS="resync/failover: skipped (SKIP_RESYNC=1)"
else
  faults_log_mark
  A1=${HTTPA[0]}; A2=${HTTPA[1]}; A3=${HTTPA[2]}
  # ---- resync: node 3 away during random writes -----------------------------------
  s=$(live_states "$A1")
  [ "$s" = active/active/active ] || log "resync: copies are $s before node 3 is killed"
  base_resynced=$(vfield "$A1" 'c(3)["resynced_bytes"]')
  # one FLUSH first: a failed copy's bitmap also takes every region written since its
  # last flush (the prefill and the rows above send none: that would be all 1 GiB)
  flushed=no
  if [ -n "$PYNBD" ]; then
    "$PYNBD" -c 'import nbd, sys; h = nbd.NBD(); h.connect_uri(sys.argv[1]); h.flush(); h.shutdown()' "$URI_RF3" \
      2>>"$SCRATCH/rf3/flush.err" && flushed=yes
  elif command -v qemu-io >/dev/null; then
    qemu-io -f raw -c flush "$URI_RF3" >>"$SCRATCH/rf3/flush.err" 2>&1 && flushed=yes
  fi
  [ "$flushed" = yes ] || log "resync: could not FLUSH the volume first (python3-libnbd or qemu-io): dirty will include the unflushed regions"
  log "resync: kill -9 node 3; fio randwrite 4k QD16 over the volume via node 1 for ${RESYNC_LOAD_SECS}s"
  kill_member 3
  rc=0
  timeout $((RESYNC_LOAD_SECS + 120)) fio --name=away --ioengine=nbd --uri="$URI_RF3" --rw=randwrite --bs=4k \
    --iodepth=16 --size=1G --time_based --runtime="$RESYNC_LOAD_SECS" --randrepeat=0 \
    --output-format=json --output="$SCRATCH/rf3/resync-load.json" >"$SCRATCH/rf3/resync-load.err" 2>&1 || rc=$?
  load=$(python3 - "$SCRATCH/rf3/resync-load.json" "$rc" <<'PY'
import json, sys
try:
    raw = open(sys.argv[1]).read(); j = json.loads(raw[raw.index('{'):])["jobs"][0]
    print("written=%d load_iops=%.0f load_err=%d" % (j["write"]["io_bytes"], j["write"]["iops"], j.get("error", 0) or int(sys.argv[2])))
except Exception:
    print("written=0 load_iops=0 load_err=%d" % (int(sys.argv[2]) or 98))
PY
)
  written=$(grep -oE 'written=[0-9]+' <<<"$load" | cut -d= -f2)
  [[ $load == *load_err=0* ]] || { log "resync: the load fio failed ($load):"; tail -5 "$SCRATCH/rf3/resync-load.err" >&2; FAULT_TROUBLE=1; }
  # copy 3 stale, its bitmap's bytes steady (two equal readings)
  dirty= prev=
  for j in $(seq 150); do
    d=$(vfield "$A1" '"%s %s" % (c(3)["state"], c(3)["dirty_bytes"])')
    if [[ $d == stale\ * ]] && [ "${d#stale }" != 0 ] && [ "$d" = "$prev" ]; then dirty=${d#stale }; break; fi
    prev=$d; sleep 0.2
  done
  if [ -z "$dirty" ]; then
    log "resync: the owner does not show copy 3 stale with dirty bytes (last: '$d')"
    dirty=${d#* }; FAULT_TROUBLE=1
  fi
  log "resync: $load, copy 3: stale, dirty_bytes=$dirty; restarting node 3"
  t0=$(now)
  start_member 3
  t_up=$(now)
  if wait_active "$A1" 3 "$RESYNC_TIMEOUT"; then
    t1=$(now)
    resynced=$(vfield "$A1" 'c(3)["resynced_bytes"]')
    resynced=$((resynced - ${base_resynced:-0}))
    RESYNC_OK=1
  else
    t1=$(now); resynced=$(vfield "$A1" 'c(3)["resynced_bytes"]'); resynced=$((${resynced:-0} - ${base_resynced:-0}))
    RESYNC_OK=0; FAULT_TROUBLE=1
    log "resync: copy 3 not active ${RESYNC_TIMEOUT}s after node 3's restart: $(vfield "$A1" 'c(3)')"
  fi
  RESYNC_LINE=$(python3 - "$written" "$dirty" "$resynced" "$t0" "$t_up" "${T_SEEN_RESYNC:-}" "$t1" "$RESYNC_OK" <<'PY'
import sys
w, d, r = (int(x or 0) for x in sys.argv[1:4])
t0, tup, tres, t1 = float(sys.argv[4]), float(sys.argv[5]), sys.argv[6], float(sys.argv[7])
ok = sys.argv[8] == "1"
T = t1 - t0
seen = "%.1f" % (float(tres) - t0) if tres else "NA"
copy = t1 - float(tres) if tres else None
rat = lambda a, b: "%.2f" % (a / b) if a and b else "NA"
print("ok=%d written=%d dirty=%d resynced=%d resync_s=%.1f up_s=%.1f seen_resyncing_s=%s resync_MBps=%.1f copy_MBps=%s amp_written=%s amp_dirty=%s" % (
    ok, w, d, r, T, tup - t0, seen, r / T / 1e6 if T > 0 else 0,
    "%.1f" % (r / copy / 1e6) if copy and copy > 0 else "NA", rat(r, w), rat(r, d)))
PY
)
  RESYNC_LINE+=" flushed_first=$flushed"
  echo "bench=replicated-resync $RESYNC_LINE $load load_secs=$RESYNC_LOAD_SECS" >>"$OUT"
  log "resync: $RESYNC_LINE"
  FAULTS=$(python3 - "$RESYNC_LINE" "$RESYNC_LOAD_SECS" "$load" <<'PY'
import sys
kv = dict(f.split("=", 1) for f in (sys.argv[1] + " " + sys.argv[3]).split())
mib = lambda b: "%.1f MiB" % (int(b) / 1048576)
met = "NA" if kv["amp_dirty"] == "NA" else ("yes" if float(kv["amp_dirty"]) <= 1.25 else "NO")
print("resync of node 3's copy (away during %s s of fio randwrite 4k QD16 via node 1, %s iops%s):" % (
    sys.argv[2], kv["load_iops"], "" if kv["load_err"] == "0" else ", FIO ERROR %s" % kv["load_err"]))
print("  written while away  %12s B  (%s)" % (kv["written"], mib(kv["written"])))
import math
n = int(kv["written"]) // 4096
ideal = 16384 * (1 - math.exp(-n / 16384.0)) * 65536
print("  dirty (bitmap)      %12s B  (%s, %d regions of 64 KiB; %s distinct random 4k writes would touch ~%.1f MiB;"
      " flushed before the kill: %s)" % (kv["dirty"], mib(kv["dirty"]), int(kv["dirty"]) // 65536, n, ideal / 1048576, kv["flushed_first"]))
print("  resynced            %12s B  (%s)" % (kv["resynced"], mib(kv["resynced"])))
print("  resync time         %s s restart -> active%s (node answered after %s s, copy first seen resyncing after %s s)" % (
    kv["resync_s"], "" if kv["ok"] == "1" else " - NOT ACTIVE, timed out", kv["up_s"], kv["seen_resyncing_s"]))
print("  throughput          %s MB/s over restart -> active; %s MB/s from first seen resyncing" % (kv["resync_MBps"], kv["copy_MBps"]))
print("  amplification       resynced/written %s   resynced/dirty %s  (target <= 1.25: %s)" % (kv["amp_written"], kv["amp_dirty"], met))
PY
)

  # ---- failover: the owner dies under a QD1 writer on node 2 ------------------------
  if [ "$RESYNC_OK" = 1 ] && [ "$(live_states "$A1")" = active/active/active ]; then
    before=$(owner_of 1 2 3)
    URI_N2=nbd://${NBDA[1]}/bench
    fo_secs=$((FAILOVER_KILL_AT + FAILOVER_AFTER))
    log "failover: fio randwrite 4k QD1 via node 2 ($URI_N2) for ${fo_secs}s; kill -9 node 1 (owner, '$before') at ${FAILOVER_KILL_AT}s"
    rm -f "$SCRATCH"/rf3/failover_*.log
    timeout $((fo_secs + 300)) fio --name=failover --ioengine=nbd --uri="$URI_N2" --rw=randwrite --bs=4k \
      --iodepth=1 --size=1G --time_based --runtime="$fo_secs" --randrepeat=0 \
      --write_lat_log="$SCRATCH/rf3/failover" --log_avg_msec=0 \
      --output-format=json --output="$SCRATCH/rf3/failover.json" >"$SCRATCH/rf3/failover.err" 2>&1 &
    FIO_PID=$!; PIDS+=("$FIO_PID")
    t_fio=$(now)
    sleep "$FAILOVER_KILL_AT"
    t_kill=$(now)
    kill_member 1
    # who owns it afterwards, and when the record said so (polled from node 2 and 3)
    t_owner= after=
    for j in $(seq $((fo_secs * 5))); do
      kill -0 "$FIO_PID" 2>/dev/null || break
      o=$(owner_of 2 3)
      if [ -n "$o" ] && [ "${o%% *}" != 1 ]; then after=$o; t_owner=$(now); break; fi
      sleep 0.2
    done
    rc=0; wait "$FIO_PID" || rc=$?
    drop_pid "$FIO_PID"
    [ -n "$after" ] || after=$(owner_of 2 3)
    latlog=$(ls "$SCRATCH"/rf3/failover_lat.*.log 2>/dev/null | head -1 || true)
    FO_LINE="$(gap_stats "$SCRATCH/rf3/failover.json" "$rc" "${latlog:-/nonexistent}") $(python3 - "$t_fio" "$t_kill" "${t_owner:-}" "$before" "$after" <<'PY'
import sys
t_fio, t_kill = float(sys.argv[1]), float(sys.argv[2])
t_owner = float(sys.argv[3]) if sys.argv[3] else None
before, after = sys.argv[4].split() or ["?", "?"], sys.argv[5].split() or ["?", "?"]
print("kill_at_ms=%.0f owner_before=%s epoch_before=%s owner_after=%s epoch_after=%s owner_seen_after_kill_s=%s" % (
    (t_kill - t_fio) * 1000, before[0], before[-1], after[0], after[-1],
    "%.1f" % (t_owner - t_kill) if t_owner else "NA"))
PY
)"
    echo "bench=replicated-failover $FO_LINE kill_at_s=$FAILOVER_KILL_AT after_s=$FAILOVER_AFTER" >>"$OUT"
    log "failover: $FO_LINE"
    [[ $FO_LINE == err=0\ * ]] || { FAULT_TROUBLE=1; log "failover: fio failed:"; tail -5 "$SCRATCH/rf3/failover.err" >&2; }
    # node 1 back; its copy resynced by the new owner
    o=$(owner_of 2 3); o=${o%% *}
    OA=${HTTPA[$(( ${o:-2} - 1 ))]}
    d1=$(vfield "$OA" '"%s %s %s" % (c(1)["state"], c(1)["dirty_bytes"], c(1)["resynced_bytes"])')
    read -r d1_state d1_dirty d1_resynced <<<"${d1:-? 0 0}" || true
    log "failover: restarting node 1 (owner now node ${o:-?}; node 1's copy there: state/dirty/resynced $d1)"
    t0=$(now)
    start_member 1
    if wait_active "$OA" 1 "$RESYNC_TIMEOUT"; then back=ok; else back="NOT ACTIVE after ${RESYNC_TIMEOUT}s"; FAULT_TROUBLE=1; fi
    t1=$(now)
    r1=$(vfield "$OA" 'c(1)["resynced_bytes"]')
    s=$(live_states "$OA")
    [ "$s" = active/active/active ] || { FAULT_TROUBLE=1; log "failover: copies at the end: $s"; }
    REJOIN="node1_state_before=$d1_state node1_dirty=$d1_dirty node1_resynced=$((${r1:-0} - ${d1_resynced:-0})) rejoin_s=$(secs "$t0" "$t1") rejoin=${back// /_} final=$s final_owner=$(owner_of 1 2 3 | tr ' ' /)"
    echo "bench=replicated-failover-rejoin $REJOIN" >>"$OUT"
    log "failover: node 1 back: $REJOIN"
    FAULTS+=$'\n'$(python3 - "$FO_LINE" "$REJOIN" "$FAILOVER_KILL_AT" "$FAILOVER_AFTER" <<'PY'
import sys
kv = dict(f.split("=", 1) for f in (sys.argv[1] + " " + sys.argv[2]).split())
mib = lambda b: "%.1f MiB" % (int(b) / 1048576) if b.isdigit() else b
print("failover (fio randwrite 4k QD1 via node 2, a non-owner; node 1 = owner killed -9 at %s s, writes went on %s s more):" % (sys.argv[3], sys.argv[4]))
print("  longest gap between completed writes  %s ms  (from %s ms on fio's clock; the kill %s ms after fio was launched)" % (kv["max_gap_ms"], kv["gap_from_ms"], kv["kill_at_ms"]))
print("  longest single write latency          %s ms" % kv["max_lat_ms"])
print("  fio error                             %s  (%s writes; %s before the gap, %s after)" % (
    kv["err"], kv["writes"], kv["writes_before_gap"], kv["writes_after_gap"]))
print("  write rate                            %s/s before the gap, %s/s after it (node 1's copy stale meanwhile)" % (
    kv["iops_before_gap"], kv["iops_after_gap"]))
print("  owner before -> after                 node %s epoch %s -> node %s epoch %s (record showed it %s s after the kill)" % (
    kv["owner_before"], kv["epoch_before"], kv["owner_after"], kv["epoch_after"], kv["owner_seen_after_kill_s"]))
print("  node 1 restarted: its copy (%s, dirty %s) resynced %s in %s s: %s; copies now %s, owner/epoch %s" % (
    kv["node1_state_before"], mib(kv["node1_dirty"]), mib(kv["node1_resynced"]), kv["rejoin_s"], kv["rejoin"].replace("_", " "), kv["final"], kv["final_owner"]))
PY
)
  else
    FAULT_TROUBLE=1
    FAULTS+=$'\n'"failover: not run (copy 3 did not come back active: $(live_states "$A1"))"
  fi
  # ---- a paused copy: a copy's node stopped (SIGSTOP) under a QD1 writer -------------
  # The trade-off Timing's io_timeout (10 s) sets: a copy silent for less than it stalls
  # the owner's writes as long as it is silent and stays ACTIVE; one silent for longer
  # stalls them io_timeout, then is STALE (resynced once it answers again).
  if [ "${SKIP_PAUSE:-0}" != 1 ]; then
    for ps in $PAUSE_SECS; do
      o=$(owner_of 1 2 3); o=${o%% *}; o=${o:-1}
      OA=${HTTPA[$((o - 1))]}
      for n in 1 2 3; do wait_active "$OA" "$n" 120 || true; done
      p=$((o % 3 + 1)) # a member holding a copy, not the owner
      URI_O=nbd://${NBDA[$((o - 1))]}/bench
      total=$((PAUSE_AT + ps + PAUSE_AFTER))
      log "pause: fio randwrite 4k QD1 via the owner (node $o) for ${total}s; node $p stopped (SIGSTOP) ${ps}s from ${PAUSE_AT}s"
      rm -f "$SCRATCH"/rf3/pause_*.log
      timeout $((total + 300)) fio --name=pause --ioengine=nbd --uri="$URI_O" --rw=randwrite --bs=4k \
        --iodepth=1 --size=1G --time_based --runtime="$total" --randrepeat=0 \
        --write_lat_log="$SCRATCH/rf3/pause" --log_avg_msec=0 \
        --output-format=json --output="$SCRATCH/rf3/pause.json" >"$SCRATCH/rf3/pause.err" 2>&1 &
      FIO_PID=$!; PIDS+=("$FIO_PID")
      sleep "$PAUSE_AT"
      kill -STOP "${NPID[$p]}"
      sleep "$ps"
      during=$(live_states "$OA")
      kill -CONT "${NPID[$p]}"
      rc=0; wait "$FIO_PID" || rc=$?
      drop_pid "$FIO_PID"
      t0=$(now)
      if wait_active "$OA" "$p" "$RESYNC_TIMEOUT"; then back=$(secs "$t0" "$(now)"); else back=NA; FAULT_TROUBLE=1; fi
      latlog=$(ls "$SCRATCH"/rf3/pause_lat.*.log 2>/dev/null | head -1 || true)
      PL=$(gap_stats "$SCRATCH/rf3/pause.json" "$rc" "${latlog:-/nonexistent}")
      line="pause_s=$ps paused_node=$p owner=$o $PL copies_at_pause_end=$during active_again_after_s=$back"
      echo "bench=replicated-pause $line io_timeout_s=10" >>"$OUT"
      log "pause: $line"
      [[ $PL == err=0\ * ]] || { FAULT_TROUBLE=1; log "pause: fio failed:"; tail -5 "$SCRATCH/rf3/pause.err" >&2; }
      FAULTS+=$'\n'$(python3 - "$line" <<'PY'
import sys
kv = dict(f.split("=", 1) for f in sys.argv[1].split())
print("paused copy (node %s stopped %s s under fio randwrite 4k QD1 via owner node %s; io_timeout 10 s):" % (kv["paused_node"], kv["pause_s"], kv["owner"]))
print("  longest gap between completed writes  %s ms; longest write %s ms; fio error %s (%s writes)" % (kv["max_gap_ms"], kv["max_lat_ms"], kv["err"], kv["writes"]))
print("  copies (node 1/2/3) as the pause ended %s; the copy active again %s s after it resumed" % (kv["copies_at_pause_end"], kv["active_again_after_s"]))
PY
)
    done
  fi
  faults_log_since | grep -iE 'warn|error|fail|panick' >"$SCRATCH/rf3/problems-faults.log" || true
  FAULTS+=$'\n'"members' warn/error log lines during the faults: $(wc -l <"$SCRATCH/rf3/problems-faults.log") (rf3/problems-faults.log)"
fi
echo "# rf3 after the faults: $(copy_states)" >>"$OUT"
SRV_PIDS=("${NPID[1]}" "${NPID[2]}" "${NPID[3]}")
log "strata RF=3: done; stopping the members"
for p in "${SRV_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
for p in "${SRV_PIDS[@]}"; do
  for _ in $(seq 300); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true
done
PIDS=()
[ "${KEEP_SCRATCH:-0}" = 1 ] || rm -rf "$SCRATCH"/rf3/n[123]/   # 3 GiB of copies; logs stay

# =====================================================================================
# 1b. Strata RF=3 again, inter-node records NOT encrypted (the bench-only switch
#     STRATA_BENCH_INTERNODE_PLAINTEXT=1: the handshake still authenticates both sides,
#     the records after it are sent in clear; bound into the handshake, so a node
#     without the switch refuses these): the write rows only, to price encryption
# =====================================================================================
PLAIN_WL=()
for w in "${WL[@]}"; do [[ $w == randwrite_* ]] && PLAIN_WL+=("$w"); done
if [ "${SKIP_PLAINTEXT:-0}" != 1 ] && [ ${#PLAIN_WL[@]} -gt 0 ]; then
  P=$SCRATCH/rf3p; mkdir -p "$P"
  mapfile -t ports < <(free_ports 9)
  PRPC=(); PNBD=(); PHTTP=(); PLPID=()
  for i in 1 2 3; do
    mkdir -p "$P/n$i"
    PRPC+=("127.0.0.1:${ports[$((i - 1))]}"); PNBD+=("127.0.0.1:${ports[$((i + 2))]}"); PHTTP+=("127.0.0.1:${ports[$((i + 5))]}")
    join=""; [ "$i" = 1 ] || join="\"${PRPC[0]}\""
    printf 'node_id = %s\ndata_dir = "%s"\nrpc = "%s"\nnbd = "%s"\nhttp = "%s"\njoin = [%s]\nsite = "a"\nrack = "r%s"\n' \
      "$i" "$P/n$i" "${PRPC[$((i - 1))]}" "${PNBD[$((i - 1))]}" "${PHTTP[$((i - 1))]}" "$join" "$i" >"$P/n$i.toml"
  done
  start_plain() { # i
    STRATA_BENCH_INTERNODE_PLAINTEXT=1 "$STRATA" serve --config "$P/n$1.toml" >>"$P/n$1.log" 2>&1 &
    PLPID[$1]=$!; PIDS+=("$!")
    wait_up "${PLPID[$1]}" "http://${PHTTP[$(($1 - 1))]}" "$P/n$1.log" "plaintext member $1"
  }
  API=http://${PHTTP[0]}
  log "strata RF=3, inter-node plaintext (bench switch): starting 3 members"
  start_plain 1
  scli cluster init >"$P/init.log" 2>&1 || { log "cluster init failed:"; cat "$P/init.log" >&2; exit 3; }
  cp "$P/n1/secret" "$P/n2/secret"; cp "$P/n1/secret" "$P/n3/secret"
  start_plain 2; start_plain 3
  grep -q 'NOT ENCRYPTED' "$P/n1.log" || { log "the plaintext switch did not take (no warning in n1.log)"; exit 3; }
  for j in $(seq 600); do
    ok=$(curl -fsS "$API/v1/cluster" 2>/dev/null | python3 -c '
import json, sys
ms = json.load(sys.stdin)["cluster"]["members"]
print(int(len(ms) == 3 and all(m["role"] == "voter" and m.get("session", {}).get("up") is True for m in ms)))' 2>/dev/null || echo 0)
    [ "$ok" = 1 ] && break
    [ "$j" = 600 ] && { log "plaintext cluster: no 3 voters in 60 s"; exit 3; }
    sleep 0.1
  done
  scli volume create bench --size "$SIZE" --replicas 3 --json >"$P/create.json" 2>&1 \
    || { log "volume create failed:"; cat "$P/create.json" >&2; exit 3; }
  for j in $(seq 300); do
    s=$(copy_states)
    [[ $s == *copies=active/active/active* ]] && break
    [ "$j" = 300 ] && { log "plaintext cluster: copies not all active after 30 s: $s"; exit 3; }
    sleep 0.1
  done
  URI_P=nbd://${PNBD[0]}/bench
  PID_STRATA=${PLPID[1]}; STRATA_LOG=$P/n1.log
  wait_nbd "$URI_P"
  prefill_nbd "$URI_P" rf3plain || exit 3
  SRV_PIDS=("${PLPID[1]}" "${PLPID[2]}" "${PLPID[3]}")
  for ((rep = 1; rep <= REPS; rep++)); do
    for w in "${PLAIN_WL[@]}"; do
      sync
      meas_begin
      if [ "$w" = randwrite_4k_qd1_fua ]; then r=$(run_fua "$URI_P"); else r=$(run_nbdbench "$URI_P" "$w" rf3plain "${PLPID[1]}"); fi
      meas_end
      record rf3plain "$w" "$rep" "$r" "after=$(copy_states) "
    done
  done
  log "strata RF=3 plaintext: done; stopping the members"
  for p in "${SRV_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${SRV_PIDS[@]}"; do
    for _ in $(seq 300); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true
  done
  PIDS=()
  [ "${KEEP_SCRATCH:-0}" = 1 ] || rm -rf "$P"/n[123]/
fi

# =====================================================================================
# 2. Strata one node
# =====================================================================================
log "strata 1-node: strata up"
start_strata "$SCRATCH/strata-data" "$SCRATCH/one.log"
scli volume create bench --size "$SIZE" >"$SCRATCH/one-create.log" 2>&1 \
  || { log "volume create failed:"; cat "$SCRATCH/one-create.log" >&2; exit 3; }
URI_ONE=$NBD_URI_BASE/bench
wait_nbd "$URI_ONE"
log "strata 1-node: $URI_ONE; prefill"
prefill_nbd "$URI_ONE" one || exit 3
SRV_PIDS=("$PID_STRATA")
for ((rep = 1; rep <= REPS; rep++)); do
  for w in "${WL[@]}"; do
    kill -0 "$PID_STRATA" 2>/dev/null || { log "strata died:"; tail -30 "$SCRATCH/one.log" >&2; exit 4; }
    sync
    meas_begin
    if [ "$w" = randwrite_4k_qd1_fua ]; then r=$(run_fua "$URI_ONE"); else r=$(run_nbdbench "$URI_ONE" "$w" one "$PID_STRATA"); fi
    meas_end
    record one "$w" "$rep" "$r"
  done
done
stop_strata 60
[ "${KEEP_SCRATCH:-0}" = 1 ] || rm -rf "$SCRATCH/strata-data"

# =====================================================================================
# 3. Ceph RBD, 3 OSDs, size 3
# =====================================================================================
ceph_missing() {
  local t m=()
  for t in ceph ceph-mon ceph-osd ceph-mgr ceph-authtool monmaptool rbd uuidgen jq; do
    command -v "$t" >/dev/null || m+=("$t")
  done
  echo "${m[*]}"
}
if [ "${SKIP_CEPH:-0}" = 1 ]; then
  CEPH_WHY="skipped (SKIP_CEPH=1)"
elif [ ! -r "$CEPH_SH" ]; then
  CEPH_WHY="no ceph.sh at $CEPH_SH (set CEPH_SH=)"
elif [ -n "$(ceph_missing)" ]; then
  CEPH_WHY="missing tool(s): $(ceph_missing) - apt-get install -y --no-install-recommends ceph-mon ceph-osd ceph-mgr ceph-common rbd-nbd fio jq"
elif ! fio --enghelp 2>/dev/null | grep -qw rbd; then
  CEPH_WHY="this fio has no rbd ioengine (Debian's fio has it; a self-built one may not)"
elif python3 -c 'import socket,sys
for p in (3300, 6789):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try: s.bind(("127.0.0.1", p))
    except OSError: sys.exit(1)
    finally: s.close()'; then
  :
else
  CEPH_WHY="127.0.0.1:3300 or :6789 is taken (another Ceph monitor running?); ceph.sh needs both"
fi
if [ -z "$CEPH_WHY" ]; then
  log "ceph: ceph.sh start (NOSD=3 SIZE=3 IMG_GB=1, DIR=$CEPH_DIR); log $SCRATCH/ceph-start.log"
  CEPH_STARTED=1
  rc=0
  DIR=$CEPH_DIR NOSD=3 SIZE=3 IMG_GB=1 timeout 600 bash "$CEPH_SH" start >"$SCRATCH/ceph-start.log" 2>&1 || rc=$?
  if [ "$rc" != 0 ]; then
    CEPH_WHY="ceph.sh start failed (exit $rc): $(grep -v '^\s*$' "$SCRATCH/ceph-start.log" | tail -3 | tr '\n' ' ')"
  elif ! grep -q "cluster ready" "$SCRATCH/ceph-start.log"; then
    CEPH_WHY="ceph.sh start did not report a ready cluster: $(tail -3 "$SCRATCH/ceph-start.log" | tr '\n' ' ')"
  fi
fi
if [ -z "$CEPH_WHY" ]; then
  export CEPH_CONF=$CEPH_DIR/ceph.conf
  health=$(ceph --conf "$CEPH_CONF" health 2>&1 | head -1)
  pgs=$(ceph --conf "$CEPH_CONF" pg stat 2>&1 | head -1)
  log "ceph: $health; $pgs"
  echo "# ceph start: $health; $pgs; $(ceph --version 2>/dev/null)" >>"$OUT"
  mapfile -t SRV_PIDS < <(cat "$CEPH_DIR"/run/*.dpid 2>/dev/null)
  log "ceph: prefill rbd/img (1G, 1 MiB sequential writes, QD8)"
  t0=$(date +%s.%N)
  if fio --name=prefill --ioengine=rbd --clientname=admin --pool=rbd --rbdname=img --rw=write --bs=1m \
       --iodepth=8 --output-format=json --output="$SCRATCH/prefill-ceph.json" >"$SCRATCH/prefill-ceph.err" 2>&1; then
    echo "# prefill ceph $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f s", b-a}')" >>"$OUT"
    for ((rep = 1; rep <= REPS; rep++)); do
      for w in "${WL[@]}"; do
        [ "$w" = randwrite_4k_qd1_fua ] && continue   # librbd has no FUA (see the header)
        sync
        meas_begin
        r=$(run_fio_rbd "$w")
        meas_end
        record ceph "$w" "$rep" "$r"
      done
    done
  else
    CEPH_WHY="fio rbd prefill failed: $(tail -3 "$SCRATCH/prefill-ceph.err" | tr '\n' ' ')"
  fi
fi
if [ "$CEPH_STARTED" = 1 ]; then
  log "ceph: ceph.sh stop"
  DIR=$CEPH_DIR bash "$CEPH_SH" stop >>"$SCRATCH/ceph-stop.log" 2>&1 || true
  CEPH_STARTED=0
fi
[ -z "$CEPH_WHY" ] || { log "ceph: no rows: $CEPH_WHY"; echo "# ceph missing: $CEPH_WHY" >>"$OUT"; }
ELAPSED=$(( $(date +%s) - T_START ))

# =====================================================================================
# the table
# =====================================================================================
TABLE=$(python3 - "$OUT" "$WORKLOADS" "$CEPH_WHY" "$ELAPSED" "$(getconf _NPROCESSORS_ONLN)" <<'PY'
import sys, statistics
path, wls, ceph_why, elapsed, ncpu = sys.argv[1], sys.argv[2].split(","), sys.argv[3], sys.argv[4], int(sys.argv[5])
runs, bad = {}, []
for ln in open(path):
    if not ln.startswith("bench=replicated "): continue
    kv = dict(f.split("=", 1) for f in ln.split() if "=" in f)
    runs.setdefault((kv["label"], kv["workload"]), []).append(kv)
    if kv.get("err") != "0": bad.append("%s/%s rep %s: err=%s iops=%s" % (kv["label"], kv["workload"], kv.get("rep"), kv.get("err"), kv.get("iops")))
def med(lab, wl, field):
    v = []
    for kv in runs.get((lab, wl), []):
        if kv.get("err") != "0": continue
        try: v.append(float(kv[field]))
        except (KeyError, ValueError): pass
    return statistics.median(v) if v else None
f = lambda x, fmt="%.0f": "-" if x is None else fmt % x
def ratio(a, b): return a / b if a and b else None
TARGET_CEPH = {"randwrite_4k_qd1": 10, "randwrite_4k_qd32": 10, "randread_4k_qd1": 3, "randread_4k_qd32": 3}
def met(r, t): return "" if r is None or t is None else ("yes" if r >= t else "NO")
hdr = ["workload", "RF3 iops", "RF3 p99us", "1node iops", "1node p99us", "ceph iops", "ceph p99us",
       "RF3/ceph", "target", "met", "RF3/1node", "target", "met"]
rows = []
for wl in wls:
    a, o, c = med("rf3", wl, "iops"), med("one", wl, "iops"), med("ceph", wl, "iops")
    rc, ro = ratio(a, c), ratio(a, o)
    t = TARGET_CEPH.get(wl)
    rows.append([wl, f(a), f(med("rf3", wl, "p99_us"), "%.0f"), f(o), f(med("one", wl, "p99_us"), "%.0f"),
                 f(c) if wl != "randwrite_4k_qd1_fua" else "n/a", f(med("ceph", wl, "p99_us"), "%.0f") if wl != "randwrite_4k_qd1_fua" else "n/a",
                 f(rc, "%.2f"), (">=%d" % t) if t else "-", met(rc, t),
                 f(ro, "%.2f"), ">=0.5", met(ro, 0.5)])
w = [max(len(r[i]) for r in [hdr] + rows) for i in range(len(hdr))]
line = lambda r: " | ".join(c.ljust(w[0]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r))
print(line(hdr)); print("-+-".join("-" * x for x in w))
for r in rows: print(line(r))
reads = [wl for wl in wls if wl.startswith("randread_") and med("rf3n2", wl, "iops")]
if reads:
    print("reads through node 2 (not the owner; it holds an ACTIVE copy and reads it under the owner's read lease):")
    for wl in reads:
        a, o, c = med("rf3n2", wl, "iops"), med("one", wl, "iops"), med("ceph", wl, "iops")
        print("  %-17s %7s iops  p99 %6s us   /1node %5s   /ceph %5s   (via the owner: %s iops)" % (
            wl, f(a), f(med("rf3n2", wl, "p99_us")), f(ratio(a, o), "%.2f"), f(ratio(a, c), "%.2f"), f(med("rf3", wl, "iops"))))
cost = [wl for wl in wls if wl.startswith("randwrite_") and med("rf3", wl, "iops") and med("one", wl, "iops")]
if cost:
    # CPU us per write = srv_cpu% * 1e4 / iops (srv_cpu: % of one CPU, all the target's processes)
    def each(lab, wl, iops):
        v = [kv.get("srv_cpu_each", "") for kv in runs.get((lab, wl), []) if kv.get("err") == "0"]
        if not v or not iops: return "-"
        try: return "/".join("%.1f" % (float(x) * 1e4 / iops) for x in v[len(v) // 2].split("/"))
        except ValueError: return "-"
    print("the write path's cost (CPU us per write: the members' CPU time over the run / writes; p50 latency):")
    print("  %-22s %10s %18s %10s %8s %6s %9s %9s %8s %6s" % ("workload", "RF3 cpu us", "per member", "1node cpu", "RF3/1n", "<=2.5", "RF3 p50", "1node p50", "RF3/1n", "<=2"))
    for wl in cost:
        a, o = med("rf3", wl, "iops"), med("one", wl, "iops")
        ca, co = med("rf3", wl, "srv_cpu"), med("one", wl, "srv_cpu")
        ua = ca * 1e4 / a if ca and a else None
        uo = co * 1e4 / o if co and o else None
        pa, po = med("rf3", wl, "p50_us"), med("one", wl, "p50_us")
        rc, rp = ratio(ua, uo), ratio(pa, po)
        qd32, qd1 = wl.endswith("_qd32"), wl.endswith("_qd1")
        print("  %-22s %10s %18s %10s %8s %6s %9s %9s %8s %6s" % (wl, f(ua, "%.1f"), each("rf3", wl, a), f(uo, "%.1f"), f(rc, "%.2f"),
              ("yes" if rc <= 2.5 else "NO") if qd32 and rc else "", f(pa), f(po), f(rp, "%.2f"),
              ("yes" if rp <= 2 else "NO") if qd1 and rp else ""))
plain = [wl for wl in wls if med("rf3plain", wl, "iops")]
if plain:
    print("inter-node encryption, RF3 writes (on: Noise AES-GCM records; off: the bench-only plaintext switch;")
    print(" cpu us/write: CPU time of the three members over the run / writes = srv_cpu%*1e4/iops):")
    print("  %-22s %9s %9s %8s %8s %10s %10s %8s" % ("workload", "iops on", "iops off", "p99 on", "p99 off", "cpu us on", "cpu us off", "on/off"))
    for wl in plain:
        a, b = med("rf3", wl, "iops"), med("rf3plain", wl, "iops")
        ca, cb = med("rf3", wl, "srv_cpu"), med("rf3plain", wl, "srv_cpu")
        ua = ca * 1e4 / a if ca and a else None
        ub = cb * 1e4 / b if cb and b else None
        print("  %-22s %9s %9s %8s %8s %10s %10s %8s" % (wl, f(a), f(b), f(med("rf3", wl, "p99_us")), f(med("rf3plain", wl, "p99_us")),
              f(ua, "%.1f"), f(ub, "%.1f"), f(ratio(a, b), "%.2f")))
print("(iops: medians over reps; p99us: total latency, submit->complete, microseconds; in the _fsync row iops")
print(" counts the writes, each followed by a FLUSH, and p99us is the write's alone: fio times the FLUSH apart)")
print()
cw = med("ceph", "randwrite_4k_qd1", "iops")
print("durable 4k QD1 write, issue target: Strata RF3's durable row >= 3x Ceph's write row (ceph randwrite_4k_qd1 = %s iops,"
      " rbd cache off: acked by the OSDs)" % f(cw))
for wl, what in (("randwrite_4k_qd1_fua", "FUA writes (libnbd Python, not fio: fio's nbd engine cannot send FUA)"),
                 ("randwrite_4k_qd1_fsync", "write + FLUSH after each (fio fsync=1)")):
    if wl not in wls: continue
    a = med("rf3", wl, "iops"); r = ratio(a, cw)
    print("  RF3 %-24s %6s iops  / ceph %6s = %5s  (>= 3) %-3s   %s" % (wl, f(a), f(cw), f(r, "%.2f"), met(r, 3), what))
print()
print("host noise per target (bg_cpu: CPU%% of everything but fio and the target's own servers, of %d; cpu_psi: %% of time a task waited for a CPU):" % (100 * ncpu))
for lab, name in (("rf3", "strata RF3"), ("one", "strata 1-node"), ("ceph", "ceph")):
    ks = [kv for (l, _), v in runs.items() if l == lab for kv in v]
    if not ks: continue
    def st(field):
        v = []
        for kv in ks:
            try: v.append(float(kv[field]))
            except (KeyError, ValueError): pass
        return "median %.1f max %.1f" % (statistics.median(v), max(v)) if v else "-"
    print("  %-13s bg_cpu %-22s cpu_psi %-22s srv_cpu %s" % (name, st("bg_cpu"), st("cpu_psi"), st("srv_cpu")))
rf3 = [kv for (l, _), v in runs.items() if l == "rf3" for kv in v]
if rf3:
    allok = all("active/active/active" in kv.get("after", "") for kv in rf3)
    print("RF3 copies after every run: %s" % ("all 3 active" if allok else "NOT all active: " +
          "; ".join("%s: %s" % (kv["workload"], kv.get("after")) for kv in rf3 if "active/active/active" not in kv.get("after", ""))))
if ceph_why: print("CEPH MISSING: " + ceph_why)
if bad:
    print("FAILED RUNS (%d):" % len(bad))
    for b in bad: print("  " + b)
print("run took %s s" % elapsed)
PY
)
echo
echo "$TABLE"
sed 's/^/# /' <<<"$TABLE" >>"$OUT"
echo
echo "kv lines + table: $OUT"
if [ -n "$FAULTS" ]; then
  echo
  echo "$FAULTS"
  sed 's/^/# /' <<<"$FAULTS" >>"$OUT"
fi
if [ -s "$SCRATCH/rf3/problems.log" ]; then
  echo "RF3 members' warn/error log lines (the RF3 runs: $RF3_T0 .. $RF3_T1): $(wc -l <"$SCRATCH/rf3/problems.log") (first 20):"
  head -20 "$SCRATCH/rf3/problems.log"
fi
# a failed run, an RF3 run that ended with a copy not active, or a failed fault run:
# exit 1 (the logs stay)
if grep -q '^FAILED RUNS' <<<"$TABLE" || [ "$RF3_TROUBLE" = 1 ] || [ "$FAULT_TROUBLE" = 1 ]; then exit 1; fi
