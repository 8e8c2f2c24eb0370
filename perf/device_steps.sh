# Sourced by the multi-GPU scripts (perf/gpu_multi.sh, perf/gpu_tp_allreduce.sh): step NAME LIMIT_S COMMAND...
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
