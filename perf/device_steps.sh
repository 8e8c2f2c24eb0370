# Sourced by the device scripts (perf/gpu_*.sh): step NAME LIMIT_S COMMAND...
# runs one part with its output in $OUT/NAME.log and its exit code in $OUT/NAME.rc; a failure or timeout is
# recorded and the run goes on. With BUDGET_S set, no part starts after it and a started part is cut at it.
step() {
  local name=$1 limit=$2; shift 2
  local left=$(( ${BUDGET_S:-1000000} - SECONDS ))
  if ((left < 20)); then
    echo "== $name: skipped (time budget spent)"; echo "skipped" >"$OUT/$name.rc"; return
  fi
  ((limit > left)) && limit=$left
  local start=$SECONDS
  echo "== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc in $((SECONDS - start)) s; last line: $(grep -v Warning "$OUT/$name.log" | tail -n 1 | cut -c1-300)"
  echo "$rc" >"$OUT/$name.rc"
}

# device_setup DEFAULT_BUDGET_S: the device scripts' common start -- the repository root as working directory and
# on PYTHONPATH, unbuffered Python, OUT (default /tmp/tritium-out) created, BUDGET_S defaulted.
device_setup() {
  cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
  export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  OUT=${OUT:-/tmp/tritium-out}
  BUDGET_S=${BUDGET_S:-$1}
  mkdir -p "$OUT"
}
