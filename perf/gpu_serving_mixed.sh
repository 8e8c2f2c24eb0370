#!/usr/bin/env bash
# On the GPU machine (after carrying .device, see ENVIRONMENT.md): the mixed workload of perf/bench_engine.py
# offline and then through a real tritonserver, Llama-3-8B shape, bf16, random weights, in one run.
#   bash perf/gpu_serving_mixed.sh        # writes $OUT/offline_mixed.json, $OUT/server_mixed-<threads>.json, logs
#   VARIANTS="process:1 process:4 stub:1" bash perf/gpu_serving_mixed.sh   # one server run per variant:
#     process|stub: the engine's step loop in its own process (default) or in the Python stub (--no-engine-process);
#     the number: responder threads (--responder-threads)
set -uo pipefail
source perf/gpu_server_env.sh   # the server, the stub's numpy, $OUT, ENGINE_FLAGS
SHAPE=${SHAPE:-llama3-8b}

# SKIP_OFFLINE=1 reuses $OUT/offline_mixed.json from an earlier run (say so when reporting the ratio)
[ -n "${SKIP_OFFLINE:-}" ] || python3 perf/bench_engine.py --shapes "$SHAPE" --mixed-only --out "$OUT/offline_mixed.json" 2>&1 | grep -v Warning | tail -4
python3 perf/make_bench_checkpoint.py --shape "$SHAPE" --out /tmp/bench-ckpt >/dev/null
# One server run per variant, each against the same offline figure
for variant in ${VARIANTS:-process:4}; do
  mode=${variant%%:*}; threads=${variant##*:}
  rm -rf /tmp/bench-repo
  python3 -m tools.generate_repo --output-dir /tmp/bench-repo --model /tmp/bench-ckpt --load-format dummy $ENGINE_FLAGS \
    --responder-threads "$threads" $([ "$mode" = stub ] && echo --no-engine-process) --quiet
  python3 -m tools.serve --model-repository /tmp/bench-repo >"$OUT/server-$mode-$threads.log" 2>&1 &
  server=$!
  python3 -m perf.wait_ready --url http://localhost:8000 --timeout "${READY_S:-240}" || { kill -TERM $server; exit 1; }
  python3 -m perf.load_mixed --requests 32 --new-tokens 16 --seed 6 --timeout 120 | grep -E "all_finished|errors" -A1  # warm
  python3 -m perf.load_mixed --out "$OUT/server_mixed-$mode-$threads.json" --timeout "${LOAD_TIMEOUT:-300}" >/dev/null
  kill -TERM "$server"; wait "$server"
done
python3 - "$OUT" <<'PY'
import glob, json, re, sys
out = sys.argv[1]
offline = json.load(open(f"{out}/offline_mixed.json"))["shapes"]
offline = next(iter(offline.values()))["mixed_256_output_tok_s"]
print(f"mixed 256x128, offline engine {offline:.0f} output tok/s; through tritonserver (gRPC streaming to llm):")
print("| step loop | responder threads | output tok/s | vs offline | TTFT p50 / p99 s | tokens per response "
      "| client CPU s / wall s |")
for path in sorted(glob.glob(f"{out}/server_mixed-*-*.json")):
    s = json.load(open(path))
    mode, threads = re.findall(r"server_mixed-(\w+)-(\d+)\.json", path)[0]
    print(f"| {mode} | {threads} | {s['output_tok_s']:.0f} | {s['output_tok_s'] / offline:.1%} | {s['ttft_p50_s']:.2f} / "
          f"{s['ttft_p99_s']:.2f} | {s['tokens_per_response']:.2f} | {s['client_cpu_s']:.1f} / {s['elapsed_s']:.1f} |"
          + ("" if s["all_finished"] and not s["errors"] else f" FAILED {s['errors']}"))
PY
