#!/usr/bin/env bash
# snapshots.sh - Strata's write performance with and without snapshots taken meanwhile.
#
# Serves one volume "bench" (SIZE, default 1 GiB) from one strata node, prefills it
# (sequential 1 MiB writes of the whole volume, so every snapshot holds real data and
# every later write is a copy-on-write of it), then runs each write workload twice per
# repetition:
#   none   the plain run, no snapshot exists;
#   snaps  the same run while SNAPSHOTS snapshots (default 10) are taken at even
#          intervals over the measured window (snapshot k at RAMP + (k-0.5)*RUNTIME/N
#          seconds after fio starts), each with `strata --api ... snapshot create
#          bench@...` against the node's HTTP API.  After the run they are deleted
#          again (`strata snapshot delete`), so every run starts from a volume with no
#          snapshot.
# The two conditions alternate their order from one repetition to the next (rep 1:
# none, snaps; rep 2: snaps, none; ...).  Runs go through /work/shared/tools/
# nbdbench.sh, or bench/fio-kv.sh for workloads nbdbench lacks, with -S (server CPU).
# At the end the node is stopped and `strata fsck --data` checks the data directory
# (snapshots were taken under load: this is also a consistency test).
#
# Usage (from anywhere; all options are environment variables):
#   bench/snapshots.sh
#   REPS=1 RUNTIME=2 RAMP=1 SIZE=256M WORKLOADS=randwrite_4k_qd32 bench/snapshots.sh  # smoke
#   STRATA_BIN=target/release/strata REPS=5 bench/snapshots.sh
#
#   REPS       repetitions of the whole matrix                 (default 3)
#   RUNTIME    measured seconds per fio run                    (default 10)
#   RAMP       warm-up seconds per fio run, not measured       (default 2)
#   SNAPSHOTS  snapshots taken during each "snaps" run         (default 10)
#   SIZE       volume size (strata syntax: 256M, 1G)           (default 1G)
#   WORKLOADS  comma list of write workloads (default: randwrite_4k_qd1,
#              randwrite_4k_qd32,seqwrite_1m_qd8,randwrite_4k_qd1_fsync,
#              randwrite_4k_4conn_fsync; see bench/nbd-compare.sh)
#   FSCK       1 = stop the node at the end and run `strata fsck --data`; 0 = skip
#                                                              (default 1)
#   STRATA_BIN path to a strata binary; skips `cargo build --release -p
#              strata-server` (which otherwise runs in the repo root and uses
#              $CARGO_TARGET_DIR, default <repo>/target)
#   BENCH_DIR  where the scratch dir (data dir, logs; removed on exit) and the
#              results file go                   (default <repo>/target/bench)
#   OUT        results file: every kv line (+ rep=N snaps=N and the snapshot
#              timings), then the table as '#' lines
#                                (default $BENCH_DIR/snapshots-YYYYmmdd-HHMMSS.txt)
#   NBDBENCH   path to nbdbench.sh         (default /work/shared/tools/nbdbench.sh)
#   FIOKV      path to fio-kv.sh           (default: fio-kv.sh beside this script)
#   KEEP_SCRATCH=1  keep the scratch dir (data dir, logs) after the run; the logs
#              are always kept when the script fails
#
# Reading the table: medians over REPS; ratio = iops with snapshots / iops without.
# The target is ratio >= 0.95 on every row (marked "<- below 0.95" otherwise).
# snap_ms = wall time of one `strata snapshot create` (CLI process included),
# median / max over all snapshots of the row; late = snapshots that completed after
# fio had finished (the run was shorter than planned: raise RUNTIME).  On this 2-core
# shared machine differences under ~10-25% are noise; check bg_cpu in the kv lines.
#
# Needs: fio (with the nbd ioengine), nbdinfo, python3, curl; cargo unless STRATA_BIN
# is given.  Runtime is roughly REPS * workloads * 2 * (RUNTIME + RAMP + ~1 s) plus the
# build, the prefill and the fsck.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_NAME=snapshots
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

REPS=${REPS:-3}
RUNTIME=${RUNTIME:-10}
RAMP=${RAMP:-2}
SNAPSHOTS=${SNAPSHOTS:-10}
SIZE=${SIZE:-1G}
FSCK=${FSCK:-1}
WORKLOADS=${WORKLOADS:-randwrite_4k_qd1,randwrite_4k_qd32,seqwrite_1m_qd8,randwrite_4k_qd1_fsync,randwrite_4k_4conn_fsync}
NBDBENCH=${NBDBENCH:-/work/shared/tools/nbdbench.sh}
FIOKV=${FIOKV:-$ROOT/bench/fio-kv.sh}

# --- tools and settings ----------------------------------------------------------------
need_tools fio nbdinfo python3 curl pgrep
need_fio_nbd
[ -r "$NBDBENCH" ] || die "nbdbench.sh not found at $NBDBENCH (set NBDBENCH=)"
[ -r "$FIOKV" ] || die "fio-kv.sh not found at $FIOKV (set FIOKV=)"
need_uint REPS RUNTIME RAMP SNAPSHOTS
[ "$REPS" -ge 1 ] && [ "$RUNTIME" -ge 1 ] && [ "$SNAPSHOTS" -ge 1 ] || die "REPS, RUNTIME and SNAPSHOTS must be >= 1"
[[ $SIZE =~ ^[0-9]+[KMGT]?$ ]] || die "SIZE must look like 256M or 1G, got '$SIZE'"
IFS=, read -r -a WL <<<"$WORKLOADS"
[ ${#WL[@]} -gt 0 ] || die "WORKLOADS is empty"
for w in "${WL[@]}"; do
  case $w in
    randwrite_4k_qd1|randwrite_4k_qd32|seqwrite_1m_qd8|randwrite_4k_qd1_fsync|randwrite_4k_4x8|randwrite_4k_4conn_fsync) ;;
    *) die "unknown or non-write workload '$w'" ;;
  esac
done
runner_for() {
  if grep -qE "^[[:space:]]*$1\\)" "$NBDBENCH"; then echo "$NBDBENCH"; else echo "$FIOKV"; fi
}
resolve_strata

# --- node, volume, prefill -------------------------------------------------------------
make_scratch
OUT=${OUT:-$BENCH_DIR/snapshots-$(date +%Y%m%d-%H%M%S).txt}
mkdir -p "$(dirname "$OUT")"
: >"$OUT"
DATA=$SCRATCH/strata-data
start_strata "$DATA" "$SCRATCH/strata.log"
log "strata: $STRATA ($("$STRATA" --version 2>/dev/null || echo '?')), pid $PID_STRATA, api $API"
scli volume create bench --size "$SIZE" >"$SCRATCH/create.log" 2>&1 \
  || { log "strata volume create failed:"; cat "$SCRATCH/create.log" >&2; exit 3; }
URI=$NBD_URI_BASE/bench
wait_nbd "$URI"
{
  echo "# snapshots $(date -u +%FT%TZ) host=$(hostname) ncpu=$(getconf _NPROCESSORS_ONLN) reps=$REPS runtime=${RUNTIME}s ramp=${RAMP}s snapshots=$SNAPSHOTS size=$SIZE"
  echo "# strata=$STRATA ($("$STRATA" --version 2>/dev/null || echo '?')) repo_head=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo NA)"
  echo "# $(fio --version) workloads=$WORKLOADS"
} >>"$OUT"

log "prefill ($SIZE, 1 MiB sequential writes)"
t0=$(date +%s.%N)
fio --name=prefill --ioengine=nbd --uri="$URI" --rw=write --bs=1m --iodepth=8 \
    --output-format=json --output="$SCRATCH/prefill.json" >"$SCRATCH/prefill.err" 2>&1 \
  || { log "prefill failed:"; tail -5 "$SCRATCH/prefill.err" >&2; exit 3; }
echo "# prefill $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f s", b-a}')" >>"$OUT"
sync

now() { date +%s.%N; }
ms_since() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1f", (b-a)*1000}'; }

# run_one REP WORKLOAD NSNAPS -> appends one line to $OUT
run_one() {
  local rep=$1 w=$2 ns=$3 runner rp t0 k target name ts ms fiopid
  local created=() create_ms=() del_ms=() late=0 fails=0 extra=""
  runner=$(runner_for "$w")
  kill -0 "$PID_STRATA" 2>/dev/null || { log "strata (pid $PID_STRATA) died; log:"; tail -20 "$STRATA_LOG" >&2; exit 4; }
  sync
  bash "$runner" -P -t "$RUNTIME" -r "$RAMP" -w "$w" -l strata -S "$PID_STRATA" -f kv "$URI" \
    >"$SCRATCH/run.out" 2>>"$SCRATCH/runner.err" &
  rp=$!; PIDS+=("$rp")
  if [ "$ns" -gt 0 ]; then
    # t0 = when fio starts (the runner first checks the export with nbdinfo)
    fiopid=
    for _ in $(seq 250); do
      fiopid=$(pgrep -P "$rp" -x fio | head -1 || true)
      [ -n "$fiopid" ] && break
      kill -0 "$rp" 2>/dev/null || break
      sleep 0.02
    done
    t0=$(now)
    [ -n "$fiopid" ] || log "could not see fio start; snapshot times are relative to now"
    for ((k = 1; k <= ns; k++)); do
      target=$(awk -v t="$t0" -v r="$RAMP" -v T="$RUNTIME" -v k="$k" -v n="$ns" 'BEGIN{printf "%.3f", t + r + (k-0.5)*T/n}')
      sleep "$(awk -v a="$target" -v b="$(now)" 'BEGIN{d=a-b; if (d<0) d=0; printf "%.3f", d}')"
      name=$(printf 'r%d-%s-%02d' "$rep" "$w" "$k")
      ts=$(now)
      if scli snapshot create "bench@$name" >>"$SCRATCH/snap.log" 2>&1; then
        create_ms+=("$(ms_since "$ts")"); created+=("$name")
      else
        fails=$((fails + 1)); log "snapshot create bench@$name failed: $(tail -1 "$SCRATCH/snap.log")"
      fi
      kill -0 "$rp" 2>/dev/null || late=$((late + 1))
    done
  fi
  wait "$rp" || true
  unset 'PIDS[${#PIDS[@]}-1]'
  for name in "${created[@]+"${created[@]}"}"; do
    ts=$(now)
    if scli snapshot delete "bench@$name" >>"$SCRATCH/snap.log" 2>&1; then
      del_ms+=("$(ms_since "$ts")")
    else
      fails=$((fails + 1)); log "snapshot delete bench@$name failed: $(tail -1 "$SCRATCH/snap.log")"
    fi
  done
  local line
  line=$(grep '^nbdbench=1' "$SCRATCH/run.out" | tail -1 || true)
  [ -n "$line" ] || line="nbdbench=1 label=strata workload=$w engine=NA iops=0 err=99"
  if [ "$ns" -gt 0 ]; then
    extra=" snap_create_ms=$(IFS=,; echo "${create_ms[*]:-NA}") snap_delete_ms=$(IFS=,; echo "${del_ms[*]:-NA}") snap_late=$late snap_fail=$fails"
  fi
  line="$line rep=$rep snaps=$ns$extra"
  echo "$line" >>"$OUT"
  printf '[%d/%d] %s\n' "$n" "$total" "$line" >&2
}

total=$(( REPS * ${#WL[@]} * 2 )); n=0
log "running $total fio runs of ${RUNTIME}+${RAMP} s; results -> $OUT"
for ((rep = 1; rep <= REPS; rep++)); do
  for w in "${WL[@]}"; do
    if (( rep % 2 == 1 )); then order=(0 "$SNAPSHOTS"); else order=("$SNAPSHOTS" 0); fi
    for ns in "${order[@]}"; do
      n=$((n + 1))
      run_one "$rep" "$w" "$ns"
    done
  done
done

# --- fsck --------------------------------------------------------------------------------
FSCK_RESULT=skipped
if [ "$FSCK" = 1 ]; then
  left=$(scli --json snapshot list bench 2>/dev/null | python3 -c "import json,sys; print(len(json.load(sys.stdin)))" || echo "?")
  log "stopping strata; fsck --data ($left snapshot(s) left)"
  stop_strata
  if "$STRATA" fsck --data-dir "$DATA" --data >"$SCRATCH/fsck.out" 2>&1; then
    FSCK_RESULT="ok: $(tr '\n' ' ' <"$SCRATCH/fsck.out" | sed 's/ *$//')"
  else
    FSCK_RESULT="FAILED (exit $?): see $SCRATCH/fsck.out"
    cat "$SCRATCH/fsck.out" >&2
  fi
  echo "# fsck --data: $FSCK_RESULT" >>"$OUT"
fi

# --- summary table -------------------------------------------------------------------------
TABLE=$(python3 - "$OUT" "$WORKLOADS" "$SNAPSHOTS" <<'PY'
import sys, statistics
path, wls, N = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3])
rows, bad, bg = {}, [], []
for ln in open(path):
    if not ln.startswith("nbdbench=1 "): continue
    kv = dict(f.split("=", 1) for f in ln.split() if "=" in f)
    key = (kv.get("workload"), int(kv.get("snaps", "0")))
    rows.setdefault(key, []).append(kv)
    try: iops = float(kv.get("iops", "0"))
    except ValueError: iops = 0
    if kv.get("err", "1") != "0" or iops <= 0:
        bad.append("%s snaps=%s rep %s: err=%s iops=%s" % (key[0], key[1], kv.get("rep"), kv.get("err"), kv.get("iops")))
    if kv.get("snap_fail", "0") != "0":
        bad.append("%s rep %s: %s snapshot command(s) failed" % (key[0], kv.get("rep"), kv["snap_fail"]))
    try: bg.append(float(kv.get("bg_cpu")))
    except (TypeError, ValueError): pass
def med(wl, ns, field):
    vals = []
    for kv in rows.get((wl, ns), []):
        if kv.get("err") != "0": continue
        try: vals.append(float(kv[field]))
        except (KeyError, ValueError): pass
    return statistics.median(vals) if vals else None
def lst(wl, field):
    vals = []
    for kv in rows.get((wl, N), []):
        for x in kv.get(field, "NA").split(","):
            try: vals.append(float(x))
            except ValueError: pass
    return vals
def f(x, fmt="%.0f"): return "-" if x is None else fmt % x
hdr = ["workload", "iops none", "iops %d snaps" % N, "ratio", "p99us none", "p99us snaps",
       "srv_us/io none", "srv_us/io snaps", "snap_ms med/max", "del_ms med/max", "late", "note"]
out = []
for wl in wls:
    a, b = med(wl, 0, "iops"), med(wl, N, "iops")
    r = b / a if a and b else None
    c, d = lst(wl, "snap_create_ms"), lst(wl, "snap_delete_ms")
    late = sum(int(kv.get("snap_late", "0")) for kv in rows.get((wl, N), []))
    out.append([wl, f(a), f(b), f(r, "%.2f"), f(med(wl, 0, "p99_us"), "%.1f"), f(med(wl, N, "p99_us"), "%.1f"),
                f(med(wl, 0, "srv_us_per_io"), "%.1f"), f(med(wl, N, "srv_us_per_io"), "%.1f"),
                "%s/%s" % (f(statistics.median(c) if c else None, "%.0f"), f(max(c) if c else None, "%.0f")),
                "%s/%s" % (f(statistics.median(d) if d else None, "%.0f"), f(max(d) if d else None, "%.0f")),
                str(late), "<- below 0.95" if r is not None and r < 0.95 else ""])
w = [max(len(x[c]) for x in [hdr] + out) for c in range(len(hdr))]
fmt = lambda x: " | ".join(c.ljust(w[0]) if j == 0 else c.rjust(w[j]) for j, c in enumerate(x)).rstrip()
print(fmt(hdr)); print("-+-".join("-" * x for x in w))
for x in out: print(fmt(x))
print("(medians over reps; ratio = iops with %d snapshots taken during the run / iops without; target >= 0.95)" % N)
if bg: print("bg_cpu (CPU%% of other processes during runs): median %.1f, max %.1f%s" %
              (statistics.median(bg), max(bg), "  <- noisy host" if max(bg) > 20 else ""))
if bad:
    print("FAILED RUNS (%d):" % len(bad))
    for b in bad: print("  " + b)
PY
)
echo
echo "$TABLE"
echo "fsck --data after the runs: $FSCK_RESULT"
sed 's/^/# /' <<<"$TABLE" >>"$OUT"
echo
echo "kv lines + table: $OUT"
if grep -q '^FAILED RUNS' <<<"$TABLE"; then exit 1; fi
case $FSCK_RESULT in FAILED*) exit 1 ;; esac
exit 0
