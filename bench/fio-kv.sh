#!/usr/bin/env bash
# fio-kv.sh - one fio run against an NBD export, printed as an nbdbench kv line.
#
# A drop-in for /work/shared/tools/nbdbench.sh for the workloads that tool does not
# have (today: randwrite_4k_4conn_fsync).  Same options, same fio flags
# (--group_reporting --norandommap --randrepeat=1, latency = submit->complete), same
# CPU accounting and the same output line, so bench/nbd-compare.sh's table and
# bench/snapshots.sh read its lines exactly like nbdbench's:
#   nbdbench=1 label workload engine iops MBps p50_us p99_us p999_us mean_us ios
#   iops_wall lchk cli_cpu srv_cpu srv_us_per_io host_busy bg_cpu cpu_psi ncpu err
# plus, for workloads with a FLUSH after every write, sync_p50_us and sync_p99_us
# (latency of the FLUSH alone; iops counts the writes only, as fio does).
# See the header of nbdbench.sh for what each field means.
#
# Usage: bench/fio-kv.sh [options] nbd://HOST:PORT/EXPORT
#   -t SEC    measured runtime per workload            (default 12)
#   -r SEC    ramp (warm-up) time, excluded from stats (default 2)
#   -w LIST   comma-separated workloads (default randwrite_4k_4conn_fsync)
#   -s SIZE   only touch the first SIZE bytes of the export (fio syntax)
#   -P        skip the prefill (sequential 1 MiB writes of the region first)
#   -l LABEL  value of the label= field (default: the URI)
#   -o DIR    keep fio's JSON output per workload in DIR
#   -S PID    PID of a LOCAL server process: also report its CPU use
#   -f FMT    kv only (accepted for compatibility with nbdbench.sh)
#   -h        help
#
# Workloads (name: fio arguments):
#   randwrite_4k_4conn_fsync  4 NBD connections (numjobs=4), each QD1 random 4k
#                             writes with an NBD FLUSH after every write (fsync=1)
#   and, with nbdbench.sh's arguments: randwrite_4k_qd1 randwrite_4k_qd32
#   randread_4k_qd1 randread_4k_qd32 seqwrite_1m_qd8 seqread_1m_qd8
#   randwrite_4k_qd1_fsync randread_4k_4x8 randwrite_4k_4x8
# The 4-connection workloads need a server that accepts >= 4 clients at once
# (qemu-nbd -e 4; nbdkit and strata accept many).
#
# Environment: none.  Needs fio (with the nbd ioengine), python3; nbdinfo if present.
set -euo pipefail

RUNTIME=12; RAMP=2; WL=randwrite_4k_4conn_fsync; SIZE=; PREFILL=1; LABEL=; OUTDIR=; SPID=; FMT=kv
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit "${1:-0}"; }
while getopts "t:r:w:s:Pl:o:S:f:h" o; do
  case $o in
    t) RUNTIME=$OPTARG ;; r) RAMP=$OPTARG ;; w) WL=$OPTARG ;; s) SIZE=$OPTARG ;;
    P) PREFILL=0 ;; l) LABEL=$OPTARG ;; o) OUTDIR=$OPTARG ;; S) SPID=$OPTARG ;;
    f) FMT=$OPTARG ;; h) usage 0 ;; *) usage 1 >&2 ;;
  esac
done
shift $((OPTIND - 1))
[ $# -eq 1 ] || usage 1 >&2
URI=$1
LABEL=${LABEL:-$URI}
[ "$FMT" = kv ] || { echo "fio-kv: only -f kv is supported" >&2; exit 2; }
case $URI in nbd://*|nbds://*|nbd+unix://*) ;; *) echo "fio-kv: not an NBD URI: $URI" >&2; exit 2 ;; esac
for t in fio python3; do
  command -v "$t" >/dev/null || { echo "fio-kv: missing tool: $t (apt-get install fio python3)" >&2; exit 2; }
done
fio --enghelp 2>/dev/null | grep -qw nbd || { echo "fio-kv: this fio has no nbd ioengine" >&2; exit 2; }

wl_args() {
  case $1 in
    randwrite_4k_4conn_fsync) echo "--rw=randwrite --bs=4k --iodepth=1 --numjobs=4 --fsync=1" ;;
    randwrite_4k_qd1)       echo "--rw=randwrite --bs=4k --iodepth=1" ;;
    randwrite_4k_qd32)      echo "--rw=randwrite --bs=4k --iodepth=32" ;;
    randread_4k_qd1)        echo "--rw=randread --bs=4k --iodepth=1" ;;
    randread_4k_qd32)       echo "--rw=randread --bs=4k --iodepth=32" ;;
    seqwrite_1m_qd8)        echo "--rw=write --bs=1m --iodepth=8" ;;
    seqread_1m_qd8)         echo "--rw=read --bs=1m --iodepth=8" ;;
    randwrite_4k_qd1_fsync) echo "--rw=randwrite --bs=4k --iodepth=1 --fsync=1" ;;
    randread_4k_4x8)        echo "--rw=randread --bs=4k --iodepth=8 --numjobs=4" ;;
    randwrite_4k_4x8)       echo "--rw=randwrite --bs=4k --iodepth=8 --numjobs=4" ;;
    prefill)                echo "--rw=write --bs=1m --iodepth=8" ;;
    *) return 1 ;;
  esac
}
WL=${WL//,/ }
for w in $WL; do wl_args "$w" >/dev/null || { echo "fio-kv: unknown workload $w" >&2; exit 2; }; done

# --- pre-flight: export reachable? -------------------------------------------------
if command -v nbdinfo >/dev/null; then
  nbdinfo --size "$URI" >/dev/null 2>&1 || { echo "fio-kv: cannot connect to $URI" >&2; exit 3; }
fi

NCPU=$(getconf _NPROCESSORS_ONLN)
HZ=$(getconf CLK_TCK)
TMPD=$(mktemp -d /tmp/fio-kv.XXXXXX)
trap 'rm -rf "$TMPD"' EXIT
[ -n "$OUTDIR" ] && mkdir -p "$OUTDIR"

# CPU accounting, as in nbdbench.sh (jiffies) ----------------------------------------
host_busy() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9; exit}' /proc/stat; }
pid_cpu()   { if [ -n "$SPID" ] && [ -r "/proc/$SPID/stat" ]; then
                sed 's/^.*) //' "/proc/$SPID/stat" | awk '{print $12+$13}'
              else echo 0; fi; }
self_children_cpu() { sed 's/^.*) //' "/proc/$$/stat" | awk '{print $14+$15}'; }
now_ns() { date +%s%N; }
cpu_psi()   { if [ -r /proc/pressure/cpu ]; then awk '/^some/{sub("total=","",$5); print $5}' /proc/pressure/cpu; else echo NA; fi; }

# fio JSON -> "iops MBps p50 p99 p999 mean ios cli_cpu err sync_p50 sync_p99"
parse_fio() {
  python3 - "$1" <<'PY'
import json, sys
raw = open(sys.argv[1]).read()
d = json.loads(raw[raw.index('{'):])
iops = bw = ios = 0.0; lat = None; err = 0; cpu = 0.0; sync = None
for j in d["jobs"]:
    err = err or j.get("error", 0)
    cpu += j.get("usr_cpu", 0) + j.get("sys_cpu", 0)
    for dd in ("read", "write"):
        s = j[dd]
        if s.get("total_ios", 0) == 0: continue
        iops += s["iops"]; bw += s["bw_bytes"]; ios += s["total_ios"]
        if lat is None or s["total_ios"] > lat[1]:
            lat = (s["lat_ns"], s["total_ios"])
    s = j.get("sync") or {}
    if s.get("total_ios", 0) and (sync is None or s["total_ios"] > sync[1]):
        sync = (s.get("lat_ns", {}), s["total_ios"])
def us(x): return "%.1f" % (x / 1000.0)
sp = (sync[0].get("percentile") or {}) if sync else {}
s50 = us(sp["50.000000"]) if "50.000000" in sp else "NA"
s99 = us(sp["99.000000"]) if "99.000000" in sp else "NA"
if lat is None:
    print("0 0 NA NA NA NA 0 %.1f %d NA NA" % (cpu, err or 1)); sys.exit()
p = lat[0].get("percentile", {})
g = lambda k: us(p[k]) if k in p else "NA"
print("%.0f %.1f %s %s %s %s %d %.1f %d %s %s" % (iops, bw / 1e6, g("50.000000"), g("99.000000"),
      g("99.900000"), us(lat[0]["mean"]), ios, cpu, err, s50, s99))
PY
}

emit_fail() { echo "nbdbench=1 label=$LABEL workload=$1 engine=fio iops=0 MBps=0 p50_us=NA p99_us=NA p999_us=NA mean_us=NA ios=0 iops_wall=NA lchk=NA cli_cpu=NA srv_cpu=NA srv_us_per_io=NA host_busy=NA bg_cpu=NA cpu_psi=NA ncpu=$NCPU err=1"; }

run_fio() { # name timed(0/1)
  local name=$1 timed=$2 args extra=() json="$TMPD/$1.json"
  args=$(wl_args "$name")
  [ "$timed" = 1 ] && extra=(--time_based "--runtime=$RUNTIME" "--ramp_time=$RAMP")
  [ -n "$SIZE" ] && extra+=("--size=$SIZE")
  local b0 s0 c0 t0 b1 s1 c1 t1 q0 q1
  b0=$(host_busy); s0=$(pid_cpu); c0=$(self_children_cpu); q0=$(cpu_psi); t0=$(now_ns)
  # shellcheck disable=SC2086
  fio --name="$name" --ioengine=nbd --uri="$URI" $args "${extra[@]}" \
      --group_reporting --norandommap --randrepeat=1 \
      --lat_percentiles=1 --percentile_list=50:99:99.9 \
      --output-format=json --output="$json" >"$TMPD/$name.stderr" 2>&1 || true
  b1=$(host_busy); s1=$(pid_cpu); c1=$(self_children_cpu); q1=$(cpu_psi); t1=$(now_ns)
  if [ -n "$OUTDIR" ]; then cp "$json" "$OUTDIR/$name.json" 2>/dev/null || true; fi
  if [ ! -s "$json" ]; then
    echo "fio-kv: fio failed for $name: $(tail -3 "$TMPD/$name.stderr")" >&2
    emit_fail "$name"; return 0
  fi
  local r; r=$(parse_fio "$json") || { echo "fio-kv: cannot parse fio output for $name" >&2; emit_fail "$name"; return 0; }
  # shellcheck disable=SC2086
  set -- $r
  local wall_s cli srv busy bg srvper psi qd nj iw lc
  wall_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN{print (b-a)/1e9}')
  cli=$(awk -v a="$c0" -v b="$c1" -v hz="$HZ" -v w="$wall_s" 'BEGIN{printf "%.1f", (b-a)/hz/w*100}')
  busy=$(awk -v a="$b0" -v b="$b1" -v hz="$HZ" -v w="$wall_s" 'BEGIN{printf "%.1f", (b-a)/hz/w*100}')
  qd=$(sed -nE 's/.*--iodepth=([0-9]+).*/\1/p' <<<"$args"); nj=$(sed -nE 's/.*--numjobs=([0-9]+).*/\1/p' <<<"$args"); nj=${nj:-1}
  iw=$(awk -v n="$7" -v w="$wall_s" -v r="$RAMP" -v t="$timed" 'BEGIN{d=(t==1)?w-r:w; if(d>0) printf "%.0f", n/d; else print "NA"}')
  lc=$(awk -v i="$1" -v m="$6" -v q="$qd" -v j="$nj" 'BEGIN{ if (m=="NA") print "NA"; else printf "%.2f", i*m/1e6/(q*j)}')
  if [ "$q0" = NA ]; then psi=NA; else psi=$(awk -v a="$q0" -v b="$q1" -v w="$wall_s" 'BEGIN{printf "%.1f", (b-a)/1e6/w*100}'); fi
  if [ -n "$SPID" ]; then
    srv=$(awk -v a="$s0" -v b="$s1" -v hz="$HZ" -v w="$wall_s" 'BEGIN{printf "%.1f", (b-a)/hz/w*100}')
    srvper=$(awk -v s="$srv" -v i="$1" 'BEGIN{ if (i>0) printf "%.2f", s/100/i*1e6; else print "NA"}')
    bg=$(awk -v B="$busy" -v c="$cli" -v s="$srv" 'BEGIN{x=B-c-s; if(x<0)x=0; printf "%.1f", x}')
  else srv=NA; srvper=NA; bg=NA; fi
  local sync=""
  case $args in *--fsync=*) sync=" sync_p50_us=${10} sync_p99_us=${11}" ;; esac
  echo "nbdbench=1 label=$LABEL workload=$name engine=fio iops=$1 MBps=$2 p50_us=$3 p99_us=$4 p999_us=$5 mean_us=$6 ios=$7 iops_wall=$iw lchk=$lc cli_cpu=$cli srv_cpu=$srv srv_us_per_io=$srvper host_busy=$busy bg_cpu=$bg cpu_psi=$psi ncpu=$NCPU err=$9$sync"
}

echo "# fio-kv uri=$URI runtime=${RUNTIME}s ramp=${RAMP}s size=${SIZE:-all} ncpu=$NCPU $(date -u +%FT%TZ)" >&2
[ "$PREFILL" = 1 ] && run_fio prefill 0
for w in $WL; do run_fio "$w" 1; done
