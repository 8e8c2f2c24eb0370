#!/usr/bin/env bash
# Multi-GPU checks and benchmarks (issue #6), in one run of about 4-6 minutes (at most ~9) on a 4-GPU machine:
#   1. greedy outputs of TP2 and TP4 equal TP1 (tiny Llama, fp32, same safetensors weights, CUDA graphs on)
#   2. batch-1 decode tok/s, Llama-3-8B shape (bf16, random weights): TP1 vs TP2 (target TP2 >= 1.6x)
#   3. mixed workload (perf/bench_engine.py's: 256 requests, 64-512 prompt tokens, 128 new): one engine on
#      GPU 0 vs two independent engine processes on GPUs 0 and 1, each running half (target >= 1.9x)
# Writes $OUT/*.json and $OUT/multi_gpu_summary.json; prints the summary table last.
#   bash perf/gpu_multi.sh                 # on the GPU machine
#   bash perf/gpu_multi.sh --cpu-smoke     # the same plumbing on CPU (gloo, tiny shape), for syntax and flow
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/tritium-out}
mkdir -p "$OUT"
SMOKE=""
TPS="1,2,4"
PY=${PY:-/opt/torch/.venv/bin/python3}
if [[ "${1:-}" == "--cpu-smoke" ]]; then
  SMOKE="--cpu-smoke"; TPS="1,2"
  [[ -x "$PY" ]] || PY=.venv/bin/python
fi
[[ -x "$PY" ]] || PY=python3
BENCH="$PY perf/bench_multi_gpu.py"
echo "python: $PY ($($PY -c 'import torch; print(torch.__version__, torch.cuda.device_count(), "GPUs")'))"

source perf/device_steps.sh  # step NAME LIMIT_S COMMAND...

step equality 240 $BENCH equality --tp "$TPS" $SMOKE --out "$OUT/equality.json"
step decode_tp1 90 $BENCH decode --tp 1 $SMOKE --out "$OUT/decode_tp1.json"
step decode_tp2 120 $BENCH decode --tp 2 $SMOKE --out "$OUT/decode_tp2.json"
step mixed_1replica 90 $BENCH mixed --device-ids 0 --part 0/1 $SMOKE --out "$OUT/mixed_1replica.json"

rm -rf "$OUT/barrier"
start=$SECONDS
echo "== mixed_2replicas (limit 120s)"
timeout --kill-after=15 120 $BENCH mixed --device-ids 0 --part 0/2 --barrier "$OUT/barrier" $SMOKE \
  --out "$OUT/mixed_replica0.json" >"$OUT/mixed_replica0.log" 2>&1 &
r0=$!
timeout --kill-after=15 120 $BENCH mixed --device-ids 1 --part 1/2 --barrier "$OUT/barrier" \
  $SMOKE --out "$OUT/mixed_replica1.json" >"$OUT/mixed_replica1.log" 2>&1 &
r1=$!
wait $r0; rc0=$?
wait $r1; rc1=$?
echo "   rc=$rc0,$rc1 in $((SECONDS - start)) s"

"$PY" - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]

def load(name):
    path = os.path.join(out, f"{name}.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        return {"error": f"no result ({exc.__class__.__name__})"}

eq, d1, d2 = load("equality"), load("decode_tp1"), load("decode_tp2")
m1, r0, r1 = load("mixed_1replica"), load("mixed_replica0"), load("mixed_replica1")
rows, summary = [], {"device": d1.get("device") or m1.get("device"), "shape": d1.get("shape")}

for key in sorted(k for k in eq if k.startswith("tp")):
    ok = eq[key].get("equal_to_tp1")
    graphs = "graphs off: " + eq[key]["cuda_graphs_error"][:60] if "cuda_graphs_error" in eq[key] else "graphs on"
    rows.append((f"greedy {key.upper()} == TP1 (fp32 tiny)", "PASS" if ok else f"FAIL {eq[key].get('first_mismatch')}", graphs))
    summary[f"greedy_{key}_equal"] = ok
if "error" in eq:
    rows.append(("greedy equality", "ERROR", eq["error"][:100]))

def ratio(a, b):
    return a / b if a and b else None

t1, t2 = d1.get("decode_b1_tok_s"), d2.get("decode_b1_tok_s")
speedup = ratio(t2, t1)
summary.update(decode_b1_tp1_tok_s=t1, decode_b1_tp2_tok_s=t2, tp2_speedup=speedup)
rows.append(("batch-1 decode TP1 tok/s", f"{t1:.1f}" if t1 else "ERROR", d1.get("error", "")[:100]))
rows.append(("batch-1 decode TP2 tok/s", f"{t2:.1f}" if t2 else "ERROR",
             (d2.get("error", "") or ("graphs off" if "cuda_graphs_error" in d2 else "graphs on"))[:100]))
rows.append(("TP2 / TP1 (target >= 1.6)", f"{speedup:.2f}x" if speedup else "-",
             "" if not speedup else ("meets target" if speedup >= 1.6 else "BELOW target")))

one = m1.get("output_tok_s")
two = None
if all(k in r for r in (r0, r1) for k in ("start_wall", "end_wall", "output_tokens")):
    span = max(r0["end_wall"], r1["end_wall"]) - min(r0["start_wall"], r1["start_wall"])
    two = (r0["output_tokens"] + r1["output_tokens"]) / span
    summary["replica_start_skew_s"] = abs(r0["start_wall"] - r1["start_wall"])
scale = ratio(two, one)
summary.update(mixed_1replica_tok_s=one, mixed_2replicas_tok_s=two, replicas_speedup=scale)
rows.append(("mixed 1 replica output tok/s", f"{one:.0f}" if one else "ERROR", m1.get("error", "")[:100]))
rows.append(("mixed 2 replicas output tok/s", f"{two:.0f}" if two else "ERROR",
             (r0.get("error", "") or r1.get("error", ""))[:100]))
rows.append(("2 replicas / 1 (target >= 1.9)", f"{scale:.2f}x" if scale else "-",
             "" if not scale else ("meets target" if scale >= 1.9 else "BELOW target")))

from perf.summary_table import write_and_print
write_and_print(os.path.join(out, "multi_gpu_summary.json"), summary,
                f"multi-GPU summary ({summary['device']}, shape {summary['shape']}); JSON in {out}", rows)
PY
