#!/usr/bin/env bash
# On the GPU machine (after carrying .device, see ENVIRONMENT.md): the mixed workload of perf/bench_engine.py
# offline and then through a real tritonserver, Llama-3-8B shape, bf16, random weights, in one run.
#   bash perf/gpu_serving_mixed.sh        # writes $OUT/offline_mixed.json, $OUT/server_mixed.json, server.log
set -uo pipefail
source .device/unpack.sh
source perf/device_stub_env.sh   # numpy 1.26 for the Python backend stub
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/tritium-out}
mkdir -p "$OUT"
SHAPE=${SHAPE:-llama3-8b}
ENGINE_FLAGS="--dtype bfloat16 --max-batch-size 256 --max-seq-len 4096 --max-num-batched-tokens 8192 --gpu-memory-utilization 0.85 --device cuda"

# SKIP_OFFLINE=1 reuses $OUT/offline_mixed.json from an earlier run (say so when reporting the ratio)
[ -n "${SKIP_OFFLINE:-}" ] || python3 perf/bench_engine.py --shapes "$SHAPE" --mixed-only --out "$OUT/offline_mixed.json" 2>&1 | grep -v Warning | tail -4
python3 perf/make_bench_checkpoint.py --shape "$SHAPE" --out /tmp/bench-ckpt >/dev/null
python3 -m tools.generate_repo --output-dir /tmp/bench-repo --model /tmp/bench-ckpt --load-format dummy $ENGINE_FLAGS --quiet
python3 -m tools.serve --model-repository /tmp/bench-repo >"$OUT/server.log" 2>&1 &
server=$!
python3 - <<'PY'
import os, time, urllib.request
for _ in range(int(os.environ.get('READY_S', 240))):
    try:
        if urllib.request.urlopen("http://localhost:8000/v2/health/ready", timeout=2).status == 200:
            break
    except OSError:
        time.sleep(1)
else:
    raise SystemExit("server not ready in time")
PY
python3 -m perf.load_mixed --requests 32 --new-tokens 16 --seed 6 --timeout 120 | grep -E "completed|all_finished|errors" -A2   # warm, other prompts
python3 -m perf.load_mixed --out "$OUT/server_mixed.json" --timeout "${LOAD_TIMEOUT:-300}"
kill -TERM "$server"; wait "$server"
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
offline = json.load(open(f"{out}/offline_mixed.json"))["shapes"]
offline = next(iter(offline.values()))["mixed_256_output_tok_s"]
server = json.load(open(f"{out}/server_mixed.json"))
print(f"mixed 256x128: offline {offline:.0f} tok/s, through tritonserver {server['output_tok_s']:.0f} tok/s "
      f"= {server['output_tok_s'] / offline:.1%}; TTFT p50 {server['ttft_p50_s']:.2f} s, p99 {server['ttft_p99_s']:.2f} s")
PY
