#!/usr/bin/env bash
# Issue #6, replicas through a real tritonserver on a 2-GPU machine (carry .device): the mixed workload of
# perf/load_mixed.py (prompts 64-512 tokens, 128 new, gRPC streaming to `llm`), Llama-3-8B shape, bf16,
# random weights, against:
#   one   = --instances 1 --gpus 0       (one engine instance, KIND_GPU on GPU 0)
#   two   = --instances 2 --gpus 0,1     (two instances, one per GPU, in the same tritonserver)
# Loads: 256 requests on both (the same workload), and 512 on two (the same load per replica as 256 on one).
# After each server's loads, the tritium_* counters per Triton instance (the spread of requests over replicas)
# and Triton's own statistics for `llm`.
#   bash perf/gpu_replicas.sh    # writes $OUT/<server>-<requests>.json, <server>-metrics.txt, <server>-stats.json
set -uo pipefail
source perf/gpu_server_env.sh   # the server, the stub's numpy, $OUT, ENGINE_FLAGS
ADMIN_KEY=replicas-bench  # statistics is an admin API (tools/serve.py); this run reads it
python3 perf/make_bench_checkpoint.py --shape llama3-8b --out /tmp/bench-ckpt >/dev/null

serve_and_load() {  # serve_and_load NAME "GENERATE FLAGS" REQUEST_COUNTS...
  local name=$1 flags=$2; shift 2
  rm -rf /tmp/replica-repo
  python3 -m tools.generate_repo --output-dir /tmp/replica-repo --model /tmp/bench-ckpt --load-format dummy \
    $ENGINE_FLAGS $flags --quiet
  python3 -m tools.serve --model-repository /tmp/replica-repo --admin-key "$ADMIN_KEY" >"$OUT/$name-server.log" 2>&1 &
  local server=$!
  python3 -m perf.wait_ready --url http://localhost:8000 --timeout "${READY_S:-300}" || { kill -TERM $server; return 1; }
  python3 -m perf.load_mixed --requests 32 --new-tokens 16 --seed 6 --timeout 120 >/dev/null  # warm
  for requests in "$@"; do
    python3 -m perf.load_mixed --requests "$requests" --out "$OUT/$name-$requests.json" --timeout 300 >/dev/null
  done
  sleep 1  # the backend pushes its counters every 0.2 s
  python3 - "$OUT/$name" "$ADMIN_KEY" <<'PY'
import sys, urllib.request
prefix, key = sys.argv[1:]
metrics = urllib.request.urlopen("http://localhost:8002/metrics", timeout=10).read().decode()
with open(f"{prefix}-metrics.txt", "w") as f:
    f.writelines(line + "\n" for line in metrics.splitlines() if line.startswith("tritium_request_success_total"))
request = urllib.request.Request("http://localhost:8000/v2/models/llm/stats", headers={"admin-key": key})
with open(f"{prefix}-stats.json", "w") as f:
    f.write(urllib.request.urlopen(request, timeout=10).read().decode())
PY
  kill -TERM $server; wait $server
}

serve_and_load one "--instances 1 --gpus 0" 256
serve_and_load two "--instances 2 --gpus 0,1" 256 512
python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
load = lambda name: json.load(open(os.path.join(out, name)))
one = load("one-256.json")["output_tok_s"]
print("| replicas | requests | output tok/s | vs one replica, 256 requests | TTFT p50 s | all finished |")
for name, n in (("one", 256), ("two", 256), ("two", 512)):
    r = load(f"{name}-{n}.json")
    print(f"| {name} | {n} | {r['output_tok_s']:.0f} | {r['output_tok_s'] / one:.2f}x | {r['ttft_p50_s']:.2f} | "
          f"{r['all_finished'] and not r['errors']} |")
for name in ("one", "two"):
    print(f"{name}: requests per instance (tritium_request_success_total):")
    print(open(os.path.join(out, f"{name}-metrics.txt")).read().strip())
PY
