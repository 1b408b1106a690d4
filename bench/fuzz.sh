#!/usr/bin/env bash
# bench/fuzz.sh - runs Strata's fuzz targets long, by hand (CI runs each for 10 s).
#
#   bench/fuzz.sh                 every target, 10 minutes each
#   SECONDS_EACH=3600 bench/fuzz.sh nbd_session checkpoint
#
# Needs cargo-fuzz (cargo install cargo-fuzz --locked). Builds on stable without a
# sanitizer (-s none): what it finds is a panic (a failed bound or assertion, an
# overflow: the targets build with debug assertions). Corpora grow in fuzz/corpus/TARGET
# (not committed); a crash is saved in fuzz/artifacts/TARGET/ and replayed with
#   cargo fuzz run --fuzz-dir fuzz -s none TARGET fuzz/artifacts/TARGET/crash-…
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SECONDS_EACH="${SECONDS_EACH:-600}"
command -v cargo >/dev/null && cargo fuzz --version >/dev/null 2>&1 \
  || { echo "fuzz: cargo-fuzz is missing: cargo install cargo-fuzz --locked" >&2; exit 2; }
[[ "$SECONDS_EACH" =~ ^[0-9]+$ ]] || { echo "fuzz: SECONDS_EACH must be a number" >&2; exit 2; }
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  for f in "$ROOT"/fuzz/fuzz_targets/*.rs; do targets+=("$(basename "$f" .rs)"); done
fi
cargo fuzz build --fuzz-dir "$ROOT/fuzz" -s none
printf '%-16s %10s %12s %s\n' target seconds runs result
for t in "${targets[@]}"; do
  log="$(mktemp)"
  mkdir -p "$ROOT/fuzz/corpus/$t"
  seeds=()
  [ -d "$ROOT/fuzz/seeds/$t" ] && seeds=("$ROOT/fuzz/seeds/$t")
  if cargo fuzz run --fuzz-dir "$ROOT/fuzz" -s none "$t" "$ROOT/fuzz/corpus/$t" "${seeds[@]}" -- \
      -max_total_time="$SECONDS_EACH" -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
    result=ok
  else
    result="FAILED (log: $log)"
  fi
  runs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')"
  printf '%-16s %10s %12s %s\n' "$t" "$SECONDS_EACH" "$runs" "$result"
  [ "$result" = ok ] && rm -f "$log"
done
