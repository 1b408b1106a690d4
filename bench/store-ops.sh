#!/usr/bin/env bash
# store-ops.sh - Strata's store operations: snapshot delete, fsck, write amplification,
# memory.
#
# One strata node, one volume "bench" of SIZE (default 1 GiB), in this order:
#   1. fill      fio sequential 1 MiB writes (QD8) of the whole volume
#   2. snapshot  `strata snapshot create bench@old`
#   3. overwrite the whole volume again (same fio job): every block of bench@old is now
#                held by the snapshot alone
#   (a) snapshot delete: exclusive_bytes of bench@old from `strata --json snapshot list
#      bench`, then `strata snapshot delete bench@old` timed (wall clock of the CLI
#      process: HTTP round trip included) -> exclusive 4 KiB blocks freed per second.
#      The node's live_bytes before/after shows what was really freed.
#      Target: >= 1,000,000 blocks/s.  With DELETE_RANDOM=1 (default) a second case
#      runs after (c): snapshot bench@scattered, RUNTIME s of random 4k overwrites
#      (QD32), delete: the exclusive blocks are scattered over many tree leaves.
#   (c) write amplification: for each WA_WORKLOADS run (fio, RUNTIME s, no ramp, random
#      4k overwrites of the whole volume), bytes written per byte fio wrote, from
#      before fio starts to SETTLE s after it ends (the node first left to go idle,
#      and the data dir's file system synced before and after):
#        device   sectors written to the block device that holds the data dir
#                 (/sys/class/block/DEV/stat): what the log device really received,
#                 file-system journal included.  Exact with LOOP=1 (a dedicated
#                 device); otherwise the device is shared and every other process's
#                 writes count too (flagged "shared" in the table).
#        syscall  the strata process's wchar (/proc/PID/io): bytes it passed to
#                 write calls: every rewrite of a not-yet-synced journal slot, plus
#                 ~20 B of NBD reply per request; an upper bound for its file writes.
#        dirty    its write_bytes: pages it dirtied, as the kernel accounts them.
#                 On kernels with large page-cache folios (6.x) a 4 KiB write into a
#                 clean large folio is accounted as the whole folio, so this can be
#                 many times the real writes (seen: 46x where the device got 3.3x);
#                 shown for reference only.
#      log_bytes (segments in use x 32 MiB) before/after is the space side.  Design:
#      QD32 -> 1 + 1/batch + checkpoints; QD1 with a FLUSH after every write -> 2 (a
#      data slot and a journal slot).  A FLUSH that must also commit the file
#      system's journal (the log file grew, or slots were allocated into a hole) adds
#      ~6 blocks of ext4 journal on the device: compare device with syscall.  The fill
#      and the overwrite above are measured the same way.
#   (d) memory: VmHWM (peak RSS) and VmRSS of the strata process after all that, per
#      GiB of live data (live_bytes from GET /v1/node) and per GiB of volume size.
#   (b) fsck: SIGTERM the node (shutdown time reported), then time `strata fsck
#      --data-dir D` and `strata fsck --data-dir D --data`: MB/s of live data
#      (live_bytes before stopping; 1 MB = 1e6 bytes) and seconds.  Both must report
#      the store clean.  The store files are in the page cache unless DROP_CACHES=1.
#   restart: `strata up` on the same data dir until its API and the volume's export
#      answer (open / replay time), and its VmHWM right after.
#
# Usage (from anywhere; all options are environment variables):
#   bench/store-ops.sh
#   SIZE=128M RUNTIME=2 bench/store-ops.sh                                 # smoke
#   STRATA_BIN=target/release/strata SIZE=4G bench/store-ops.sh
#
#   SIZE          volume size (strata syntax: 128M, 1G, 4G)          (default 1G)
#   RUNTIME       seconds per write-amplification run                (default 10)
#   WA_WORKLOADS  comma list of random 4k overwrite runs for (c), from
#                 randwrite_4k_qd1, randwrite_4k_qd32, randwrite_4k_qd1_fsync,
#                 randwrite_4k_4conn_fsync
#                            (default randwrite_4k_qd32,randwrite_4k_qd1_fsync)
#   SETTLE        seconds to wait after each write phase before reading the
#                 counters, so background checkpoint / cleaner work is counted
#                                                                    (default 2)
#   QUIESCE_MAX   before each write phase the script waits until strata has
#                 written nothing for 1.5 s (so the previous phase's cleaner and
#                 checkpoint work, e.g. after the snapshot delete, is not counted
#                 in it), at most this many seconds                  (default 60)
#   DELETE_RANDOM 1 = also measure the scattered snapshot delete (see (a)); 0 = skip
#                                                                    (default 1)
#   LOOP=1        put the data dir on its own ext4 file system on a loop device
#                 (an image file in the scratch dir, 3 x SIZE + 1 GiB, sparse), so
#                 the device column of (c) counts strata's writes only.  Needs root,
#                 losetup, mkfs.ext4, mount; unmounted and detached on exit (off by
#                 default: it changes machine state while it runs)
#   DROP_CACHES=1 `sync; echo 3 > /proc/sys/vm/drop_caches` before each fsck (root;
#                 affects the whole machine: off by default)
#   STRATA_BIN    path to a strata binary; skips `cargo build --release -p
#                 strata-server` (which otherwise runs in the repo root and uses
#                 $CARGO_TARGET_DIR, default <repo>/target)
#   BENCH_DIR     where the scratch dir (data dir, logs; removed on exit) and the
#                 results file go                      (default <repo>/target/bench)
#   OUT           results file: one kv line per measurement, then the table as '#'
#                 lines             (default $BENCH_DIR/store-ops-YYYYmmdd-HHMMSS.txt)
#   KEEP_SCRATCH=1  keep the scratch dir (data dir, logs) after the run; the logs are
#                 always kept when the script fails
#
# Exit status: 0, or 1 when a measurement failed or fsck found a problem (the table
# is printed either way), 2 for a bad setting or a missing tool, 3-4 when strata
# failed to start or died.
# Needs: fio (with the nbd ioengine), nbdinfo, python3, curl; cargo unless STRATA_BIN
# is given; with LOOP=1 root, losetup, mkfs.ext4.  Needs about 3 x SIZE of free disk
# (the log holds the snapshot, the overwrites and dead space until the cleaner runs).
# Runtime is roughly 2 fills of SIZE + (WA_WORKLOADS + 1) x (RUNTIME + SETTLE + ~2 s)
# + the fscks.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_NAME=store-ops
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

SIZE=${SIZE:-1G}
RUNTIME=${RUNTIME:-10}
SETTLE=${SETTLE:-2}
WA_WORKLOADS=${WA_WORKLOADS:-randwrite_4k_qd32,randwrite_4k_qd1_fsync}
DROP_CACHES=${DROP_CACHES:-0}
QUIESCE_MAX=${QUIESCE_MAX:-60}
DELETE_RANDOM=${DELETE_RANDOM:-1}
LOOP=${LOOP:-0}

# --- tools and settings ----------------------------------------------------------------
need_tools fio nbdinfo python3 curl
need_fio_nbd
need_uint RUNTIME SETTLE QUIESCE_MAX
[ "$RUNTIME" -ge 1 ] || die "RUNTIME must be >= 1"
[[ $SIZE =~ ^[0-9]+[KMGT]?$ ]] || die "SIZE must look like 128M or 1G, got '$SIZE'"
IFS=, read -r -a WA <<<"$WA_WORKLOADS"
for w in "${WA[@]}"; do
  case $w in
    randwrite_4k_qd1|randwrite_4k_qd32|randwrite_4k_qd1_fsync|randwrite_4k_4conn_fsync) ;;
    *) die "unknown WA workload '$w'" ;;
  esac
done
if [ "$LOOP" = 1 ]; then
  for t in losetup mkfs.ext4 mount umount; do command -v "$t" >/dev/null || die "LOOP=1 needs $t (apt-get install mount e2fsprogs)"; done
  [ "$(id -u)" = 0 ] || die "LOOP=1 needs root (losetup, mount)"
fi
if [ "$DROP_CACHES" = 1 ] && ! [ -w /proc/sys/vm/drop_caches ]; then
  die "DROP_CACHES=1 needs write access to /proc/sys/vm/drop_caches (root)"
fi
resolve_strata

make_scratch
OUT=${OUT:-$BENCH_DIR/store-ops-$(date +%Y%m%d-%H%M%S).txt}
mkdir -p "$(dirname "$OUT")"
: >"$OUT"
DATA=$SCRATCH/strata-data
LOOPDEV=
bench_teardown() { # called by lib.sh's exit trap, after strata is gone
  if [ -n "$LOOPDEV" ]; then
    umount "$SCRATCH/mnt" 2>/dev/null || umount -l "$SCRATCH/mnt" 2>/dev/null || true
    losetup -d "$LOOPDEV" 2>/dev/null || true
    [ "${KEEP_SCRATCH:-0}" = 1 ] || rm -f "$SCRATCH/loop.img"
  fi
}
if [ "$LOOP" = 1 ]; then
  case $SIZE in
    *K) SIZE_MIB=$(( ${SIZE%K} / 1024 )) ;; *M) SIZE_MIB=${SIZE%M} ;;
    *G) SIZE_MIB=$(( ${SIZE%G} * 1024 )) ;; *T) SIZE_MIB=$(( ${SIZE%T} * 1048576 )) ;;
    *) SIZE_MIB=$(( SIZE / 1048576 )) ;;
  esac
  truncate -s "$(( SIZE_MIB * 3 + 1024 ))M" "$SCRATCH/loop.img"
  LOOPDEV=$(losetup -f --show "$SCRATCH/loop.img") || die "losetup failed"
  mkfs.ext4 -q -F "$LOOPDEV" >"$SCRATCH/mkfs.log" 2>&1 || die "mkfs.ext4 $LOOPDEV failed: $(cat "$SCRATCH/mkfs.log")"
  mkdir -p "$SCRATCH/mnt"
  mount "$LOOPDEV" "$SCRATCH/mnt" || die "mount $LOOPDEV failed"
  DATA=$SCRATCH/mnt/strata-data
  log "data dir on $LOOPDEV (ext4, image $SCRATCH/loop.img)"
fi
mkdir -p "$DATA"
# the block device under the data dir, for the device column of (c)
DEVSRC=$(df --output=source "$DATA" | tail -1)
DEVSTAT=; DEVNAME=NA; DEVKIND=shared
if [ -b "$DEVSRC" ]; then
  DEVNAME=$(basename "$(readlink -f "$DEVSRC")")
  [ -r "/sys/class/block/$DEVNAME/stat" ] && DEVSTAT=/sys/class/block/$DEVNAME/stat
fi
[ -n "$LOOPDEV" ] && DEVKIND=dedicated
[ -n "$DEVSTAT" ] || log "no block device statistics for $DEVSRC: the device column of (c) is NA"
PROBLEMS=()
problem() { PROBLEMS+=("$*"); log "PROBLEM: $*"; }

now() { date +%s.%N; }
secs_since() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.3f", b-a}'; }
io_write_bytes() { awk '/^write_bytes:/{print $2}' "/proc/$PID_STRATA/io"; }
io_wchar() { awk '/^wchar:/{print $2}' "/proc/$PID_STRATA/io"; }
dev_written() { if [ -n "$DEVSTAT" ]; then awk '{printf "%.0f\n", $7 * 512}' "$DEVSTAT"; else echo NA; fi; }
sync_data() { sync -f "$DATA" 2>/dev/null || sync; }
status_kb() { awk -v k="$1:" '$1 == k {print $2}' "/proc/$PID_STRATA/status"; }
kv() { echo "store_ops=1 $*" >>"$OUT"; log "$*"; }

# fio_job NAME ARGS... -> "write_io_bytes iops" from fio's JSON (whole run, no ramp)
fio_job() {
  local name=$1; shift
  kill -0 "$PID_STRATA" 2>/dev/null || { log "strata (pid $PID_STRATA) died; log:"; tail -20 "$STRATA_LOG" >&2; exit 4; }
  if ! fio --name="$name" --ioengine=nbd --uri="$URI" "$@" --group_reporting --norandommap --randrepeat=1 \
         --output-format=json --output="$SCRATCH/$name.json" >"$SCRATCH/$name.err" 2>&1; then
    problem "fio $name failed: $(tail -2 "$SCRATCH/$name.err" | tr '\n' ' ')"
    echo "0 0"; return 0
  fi
  python3 - "$SCRATCH/$name.json" <<'PY'
import json, sys
raw = open(sys.argv[1]).read(); d = json.loads(raw[raw.index('{'):])
b = sum(j["write"]["io_bytes"] for j in d["jobs"]); i = sum(j["write"]["iops"] for j in d["jobs"])
e = max(j.get("error", 0) for j in d["jobs"])
print(b if e == 0 else 0, "%.0f" % i)
PY
}

# quiesce: wait until strata has written nothing for 1.5 s (the maintenance thread runs
# every 0.5 s), at most QUIESCE_MAX s; prints the seconds waited.  So one phase's
# cleaner and checkpoint work is not counted in the next phase.
quiesce() {
  local t0 w prev stable=0
  t0=$(now); prev=$(io_write_bytes)
  while [ "$stable" -lt 3 ]; do
    sleep 0.5
    w=$(io_write_bytes)
    if [ "$w" = "$prev" ]; then stable=$((stable + 1)); else stable=0; fi
    prev=$w
    if awk -v a="$t0" -v b="$(now)" -v m="$QUIESCE_MAX" 'BEGIN{exit !(b-a > m)}'; then
      log "strata still writing after ${QUIESCE_MAX} s without I/O; measuring anyway"; break
    fi
  done
  secs_since "$t0"
}

# write_phase NAME ARGS... : fio run + write amplification kv line
write_phase() {
  local name=$1; shift
  local w0 x0 d0 l0 t0 r bytes iops w1 x1 d1 l1 secs q
  sync_data
  q=$(quiesce)
  sync_data
  w0=$(io_write_bytes); x0=$(io_wchar); d0=$(dev_written); l0=$(node_field log_bytes); t0=$(now)
  r=$(fio_job "$name" "$@")
  secs=$(secs_since "$t0")
  sleep "$SETTLE"
  sync_data
  w1=$(io_write_bytes); x1=$(io_wchar); d1=$(dev_written); l1=$(node_field log_bytes)
  read -r bytes iops <<<"$r"
  kv "$(awk -v n="$name" -v b="$bytes" -v i="$iops" -v s="$secs" -v w0="$w0" -v w1="$w1" -v x0="$x0" -v x1="$x1" \
          -v d0="$d0" -v d1="$d1" -v l0="$l0" -v l1="$l1" -v q="$q" -v dn="$DEVNAME" -v dk="$DEVKIND" '
    function ratio(x) { return (b > 0 ? sprintf("%.3f", x / b) : "NA") }
    BEGIN{ dv = (d0 == "NA" ? "NA" : sprintf("%.0f", d1 - d0))
           printf "op=write name=%s fio_bytes=%.0f iops=%s fio_secs=%s device=%s device_kind=%s device_bytes=%s wa_device=%s strata_wchar=%.0f wa_syscall=%s strata_write_bytes=%.0f wa_dirty=%s log_bytes_before=%.0f log_bytes_after=%.0f quiesced_secs=%s",
             n, b, i, s, dn, dk, dv, (dv == "NA" ? "NA" : ratio(dv)), x1-x0, ratio(x1-x0), w1-w0, ratio(w1-w0), l0, l1, q}')"
}

# --- node, volume ----------------------------------------------------------------------
start_strata "$DATA" "$SCRATCH/strata.log"
log "strata: $STRATA ($("$STRATA" --version 2>/dev/null || echo '?')), pid $PID_STRATA, api $API"
scli volume create bench --size "$SIZE" >"$SCRATCH/create.log" 2>&1 \
  || { log "strata volume create failed:"; cat "$SCRATCH/create.log" >&2; exit 3; }
URI=$NBD_URI_BASE/bench
wait_nbd "$URI"
SIZE_BYTES=$(scli --json volume info bench | python3 -c "import json,sys; print(json.load(sys.stdin)['size_bytes'])")
{
  echo "# store-ops $(date -u +%FT%TZ) host=$(hostname) ncpu=$(getconf _NPROCESSORS_ONLN) size=$SIZE ($SIZE_BYTES B) runtime=${RUNTIME}s settle=${SETTLE}s drop_caches=$DROP_CACHES device=$DEVNAME ($DEVKIND) kernel=$(uname -r)"
  echo "# strata=$STRATA ($("$STRATA" --version 2>/dev/null || echo '?')) repo_head=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo NA)"
  echo "# $(fio --version) wa_workloads=$WA_WORKLOADS"
} >>"$OUT"

# --- 1-3: fill, snapshot, overwrite --------------------------------------------------------
log "fill $SIZE (1 MiB sequential writes)"
write_phase fill --rw=write --bs=1m --iodepth=8
scli snapshot create bench@old >"$SCRATCH/snap.log" 2>&1 || { problem "snapshot create failed: $(cat "$SCRATCH/snap.log")"; }
log "overwrite $SIZE (1 MiB sequential writes) under snapshot bench@old"
write_phase overwrite --rw=write --bs=1m --iodepth=8

# --- (a) snapshot delete ---------------------------------------------------------------------
# delete_snapshot SNAP KIND [EXPECTED_EXCLUSIVE_BYTES]: time `strata snapshot delete bench@SNAP`
delete_snapshot() {
  local snap=$1 kind=$2 expect=${3:-} excl live0 live1 t0 secs
  sync
  quiesce >/dev/null
  excl=$(scli --json snapshot list bench | python3 -c "
import json, sys
for s in json.load(sys.stdin):
    if s.get('snapshot') == sys.argv[1] or s.get('name') == 'bench@' + sys.argv[1]: print(s['exclusive_bytes']); break
else: print(-1)" "$snap")
  [ "$excl" -ge 0 ] || problem "bench@$snap not in 'snapshot list bench'"
  if [ -n "$expect" ] && [ "$excl" -ne "$expect" ]; then
    problem "bench@$snap exclusive_bytes=$excl after a full overwrite, expected $expect"
  fi
  live0=$(node_field live_bytes)
  t0=$(now)
  if scli snapshot delete "bench@$snap" >"$SCRATCH/delete-$snap.log" 2>&1; then
    secs=$(secs_since "$t0")
  else
    secs=NA; problem "snapshot delete bench@$snap failed: $(cat "$SCRATCH/delete-$snap.log")"
  fi
  live1=$(node_field live_bytes)
  [ $((live0 - live1)) -eq "$excl" ] || problem "snapshot delete bench@$snap freed $((live0 - live1)) live bytes, exclusive_bytes said $excl"
  kv "$(awk -v k="$kind" -v e="$excl" -v s="$secs" -v l0="$live0" -v l1="$live1" \
    'BEGIN{printf "op=snapshot_delete kind=%s exclusive_bytes=%.0f exclusive_blocks=%.0f secs=%s blocks_per_s=%s live_before=%.0f live_after=%.0f freed_bytes=%.0f",
           k, e, e/4096, s, (s != "NA" && s > 0 ? sprintf("%.0f", e/4096/s) : "NA"), l0, l1, l0-l1}')"
}
delete_snapshot old seq "$SIZE_BYTES"

# --- (c) write amplification ---------------------------------------------------------------
for w in "${WA[@]}"; do
  log "write amplification: $w for ${RUNTIME} s"
  case $w in
    randwrite_4k_qd1)         args=(--rw=randwrite --bs=4k --iodepth=1) ;;
    randwrite_4k_qd32)        args=(--rw=randwrite --bs=4k --iodepth=32) ;;
    randwrite_4k_qd1_fsync)   args=(--rw=randwrite --bs=4k --iodepth=1 --fsync=1) ;;
    randwrite_4k_4conn_fsync) args=(--rw=randwrite --bs=4k --iodepth=1 --numjobs=4 --fsync=1) ;;
  esac
  write_phase "$w" "${args[@]}" --time_based "--runtime=$RUNTIME"
done

# --- (a, second case) snapshot delete after scattered 4k overwrites ------------------------------
if [ "$DELETE_RANDOM" = 1 ]; then
  scli snapshot create bench@scattered >"$SCRATCH/snap2.log" 2>&1 || problem "snapshot create failed: $(cat "$SCRATCH/snap2.log")"
  log "random 4k overwrites (QD32, ${RUNTIME} s) under snapshot bench@scattered"
  write_phase scattered_overwrite --rw=randwrite --bs=4k --iodepth=32 --time_based "--runtime=$RUNTIME"
  delete_snapshot scattered random4k
fi

# --- (d) memory ------------------------------------------------------------------------------
sleep 0.2
LIVE=$(node_field live_bytes); LOGB=$(node_field log_bytes)
HWM=$(status_kb VmHWM); RSS=$(status_kb VmRSS)
kv "$(awk -v h="$HWM" -v r="$RSS" -v l="$LIVE" -v s="$SIZE_BYTES" -v g="$LOGB" \
  'BEGIN{printf "op=memory vmhwm_kib=%.0f vmrss_kib=%.0f live_bytes=%.0f log_bytes=%.0f size_bytes=%.0f hwm_mib_per_live_gib=%s hwm_mib_per_size_gib=%.1f",
         h, r, l, g, s, (l>0 ? sprintf("%.1f", h/1024/(l/2^30)) : "NA"), h/1024/(s/2^30)}')"

# --- (b) fsck ----------------------------------------------------------------------------------
log "stopping strata (SIGTERM)"
t0=$(now); stop_strata; STOP_SECS=$(secs_since "$t0")
kv "op=stop secs=$STOP_SECS"
for mode in meta data; do
  flags=(); [ "$mode" = data ] && flags=(--data)
  if [ "$DROP_CACHES" = 1 ]; then sync; echo 3 >/proc/sys/vm/drop_caches; fi
  t0=$(now); rc=0
  "$STRATA" --json fsck --data-dir "$DATA" "${flags[@]}" >"$SCRATCH/fsck-$mode.json" 2>"$SCRATCH/fsck-$mode.err" || rc=$?
  secs=$(secs_since "$t0")
  findings=$(python3 -c "
import json, sys
try: d = json.load(open(sys.argv[1])); print(len(d.get('findings', [])))
except Exception: print('NA')" "$SCRATCH/fsck-$mode.json")
  [ "$rc" -eq 0 ] && [ "$findings" = 0 ] || problem "fsck ($mode) exit $rc, findings $findings: $(head -c 600 "$SCRATCH/fsck-$mode.json" "$SCRATCH/fsck-$mode.err" | tr '\n' ' ')"
  kv "$(awk -v m="$mode" -v s="$secs" -v l="$LIVE" -v rc="$rc" -v f="$findings" \
    'BEGIN{printf "op=fsck mode=%s secs=%s live_bytes=%.0f MBps=%s exit=%.0f findings=%s", m, s, l, (s>0 ? sprintf("%.1f", l/1e6/s) : "NA"), rc, f}')"
done

# --- restart -----------------------------------------------------------------------------------
log "restarting strata on the same data dir"
t0=$(now)
start_strata "$DATA" "$SCRATCH/strata.log"
URI=$NBD_URI_BASE/bench
wait_nbd "$URI"
UP_SECS=$(secs_since "$t0")
LIVE_R=$(node_field live_bytes)
[ "$LIVE_R" -eq "$LIVE" ] || problem "live_bytes after restart $LIVE_R != before stop $LIVE"
kv "op=restart secs=$UP_SECS vmhwm_kib=$(status_kb VmHWM) live_bytes=$LIVE_R"
stop_strata

# --- table -----------------------------------------------------------------------------------------
TABLE=$(python3 - "$OUT" <<'PY'
import sys
rec = []
for ln in open(sys.argv[1]):
    if ln.startswith("store_ops=1 "):
        rec.append(dict(f.split("=", 1) for f in ln.split() if "=" in f))
def fnum(x, fmt):
    try: return fmt % float(x)
    except (TypeError, ValueError): return str(x)
rows = []
for r in rec:
    op = r["op"]
    if op == "write":
        dev = "%s %s" % (fnum(r["wa_device"], "%.3f"), "x" if r["device_kind"] == "dedicated" else "x (shared dev)")
        rows.append(("write amplification: " + r["name"], dev,
                     "syscall %s x, dirty %s x; fio %.1f MiB at %s iops; device %s got %s MiB; log %.0f -> %.0f MiB; idle after %s s" % (
                         fnum(r["wa_syscall"], "%.2f"), fnum(r["wa_dirty"], "%.2f"),
                         int(r["fio_bytes"]) / 2**20, r["iops"], r["device"],
                         fnum(float(r["device_bytes"]) / 2**20 if r["device_bytes"] != "NA" else "NA", "%.1f"),
                         int(r["log_bytes_before"]) // 2**20, int(r["log_bytes_after"]) // 2**20, r.get("quiesced_secs", "?"))))
    elif op == "snapshot_delete":
        bps = r["blocks_per_s"]
        ok = "" if bps == "NA" else ("  (target >= 1M: %s)" % ("met" if float(bps) >= 1e6 else "NOT met"))
        rows.append(("snapshot delete (%s overwrite)" % r.get("kind", "?"), fnum(bps, "%.0f") + " blocks/s",
                     "%s exclusive blocks in %s s; live bytes freed %.1f MiB%s" % (
                         r["exclusive_blocks"], r["secs"], int(r["freed_bytes"]) / 2**20, ok)))
    elif op == "memory":
        rows.append(("peak RSS (VmHWM)", "%.1f MiB" % (int(r["vmhwm_kib"]) / 1024),
                     "%s MiB per GiB live (live %.1f MiB), %s MiB per GiB of volume size; VmRSS %.1f MiB" % (
                         r["hwm_mib_per_live_gib"], int(r["live_bytes"]) / 2**20, r["hwm_mib_per_size_gib"],
                         int(r["vmrss_kib"]) / 1024)))
    elif op == "stop":
        rows.append(("stop (SIGTERM -> exit)", r["secs"] + " s", ""))
    elif op == "fsck":
        rows.append(("fsck" + (" --data" if r["mode"] == "data" else ""),
                     fnum(r["MBps"], "%.1f") + " MB/s" if r["exit"] == "0" else "FAILED",
                     "%s s for %.1f MiB live; exit %s, %s finding(s)" % (
                         r["secs"], int(r["live_bytes"]) / 2**20, r["exit"], r["findings"])))
    elif op == "restart":
        rows.append(("restart (up -> export served)", r["secs"] + " s",
                     "VmHWM after open %.1f MiB" % (int(r["vmhwm_kib"]) / 1024)))
hdr = ("measurement", "value", "details")
w = [max(len(x[c]) for x in [hdr] + rows) for c in range(2)]
print("%s | %s | %s" % (hdr[0].ljust(w[0]), hdr[1].rjust(w[1]), hdr[2]))
print("%s-+-%s-+-%s" % ("-" * w[0], "-" * w[1], "-" * 40))
for x in rows: print(("%s | %s | %s" % (x[0].ljust(w[0]), x[1].rjust(w[1]), x[2])).rstrip())
PY
)
echo
echo "$TABLE"
sed 's/^/# /' <<<"$TABLE" >>"$OUT"
if [ ${#PROBLEMS[@]} -gt 0 ]; then
  echo "PROBLEMS (${#PROBLEMS[@]}):"
  printf '  %s\n' "${PROBLEMS[@]}"
  printf '# PROBLEM: %s\n' "${PROBLEMS[@]}" >>"$OUT"
fi
echo
echo "kv lines + table: $OUT"
[ ${#PROBLEMS[@]} -eq 0 ] || exit 1
